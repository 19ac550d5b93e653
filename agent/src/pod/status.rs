//! The v1 PodStatus of one pod, computed purely from the desired pod, the worker's observations
//! and the previously reported status, with the kubelet's rules: phase (terminal only once every
//! container has stopped, and sticky once terminal), the kubelet-owned conditions (their
//! lastTransitionTime moves only when their status does), container statuses, IPs, QoS.

use std::net::IpAddr;
use std::time::SystemTime;

use jiff::Timestamp;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
    ResourceRequirements, VolumeMountStatus,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::api::{Phase, RestartPolicy};
use super::machine::{self, Attempt, ContainerObs, Exit, Kind, Observed, PodState, Why};
use super::resources;

const OWNED: [&str; 5] = [
    "PodReadyToStartContainers",
    "Initialized",
    "Ready",
    "ContainersReady",
    "PodScheduled",
];

/// What the status is computed from.
pub struct Input<'a> {
    /// The desired pod (its status holds conditions other owners set, e.g. readiness gates).
    pub pod: &'a Pod,
    /// The status reported last (None at first).
    pub previous: Option<&'a PodStatus>,
    pub obs: &'a Observed,
    /// The worker's state after the last step.
    pub state: PodState,
    pub node_ip: Option<IpAddr>,
    /// The sandbox's IP (None for hostNetwork pods, which report the node's).
    pub pod_ip: Option<IpAddr>,
}

/// A Kubernetes time, whole seconds (as the API stores it).
/// Every container status of a pod: init (sidecars included), app, ephemeral.
pub fn all_container_statuses(status: &PodStatus) -> impl Iterator<Item = &ContainerStatus> {
    [
        &status.init_container_statuses,
        &status.container_statuses,
        &status.ephemeral_container_statuses,
    ]
    .into_iter()
    .flatten()
    .flatten()
}

pub fn time(t: SystemTime) -> Time {
    let ts = Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH);
    Time(Timestamp::from_second(ts.as_second()).unwrap_or(ts))
}

/// Computes the pod's status.
pub fn compute(input: &Input) -> PodStatus {
    let pod = input.pod;
    let spec = pod.spec.clone().unwrap_or_default();
    let all = machine::containers(pod);
    // Lists made to their length: the status is kept (shared) until it changes, and a list
    // collected from a filter starts at room for four (2.8 KiB for one container's status).
    let statuses = |kinds: &[Kind]| -> Vec<ContainerStatus> {
        let of_kinds = || all.iter().filter(|(k, _)| kinds.contains(k));
        let mut out = Vec::with_capacity(of_kinds().count());
        out.extend(of_kinds().map(|(k, c)| container_status(input, *k, c)));
        out
    };
    let init_statuses = statuses(&[Kind::Init, Kind::Sidecar]);
    let app_statuses = statuses(&[Kind::App]);
    let ephemeral: Vec<ContainerStatus> = machine::ephemeral(pod)
        .iter()
        .map(|c| container_status(input, Kind::Ephemeral, c))
        .collect();
    let terminal = input.state == PodState::Terminated;
    let (phase, reason, message) = phase_of(input, &all, &init_statuses, &app_statuses, terminal);
    let host_ip = input.node_ip.map(|ip| ip.to_string());
    let pod_ip = match spec.host_network {
        Some(true) => host_ip.clone(),
        _ => input.pod_ip.map(|ip| ip.to_string()),
    };
    let start_time = input
        .previous
        .and_then(|p| p.start_time.clone())
        .or_else(|| input.obs.start_time.map(time));
    let mut status = PodStatus {
        phase: Some(phase.as_str().to_string()),
        reason,
        message,
        host_ips: host_ip.clone().map(|ip| vec![HostIP { ip }]),
        host_ip,
        pod_ips: pod_ip.clone().map(|ip| vec![PodIP { ip }]),
        pod_ip,
        start_time,
        qos_class: Some(resources::qos_class(pod).to_string()),
        observed_generation: pod.metadata.generation,
        init_container_statuses: (!init_statuses.is_empty()).then_some(init_statuses),
        container_statuses: Some(app_statuses),
        ephemeral_container_statuses: (!ephemeral.is_empty()).then_some(ephemeral),
        ..Default::default()
    };
    status.conditions = Some(conditions(input, phase, &status));
    // InPlacePodLevelResourcesVerticalScaling (beta, on in v1.36): the pod's aggregated
    // requests and limits (the kubelet reads a running pod's back from its cgroup, which holds
    // what the agent set from the same spec); `{}` for a pod with none.
    let non_empty = |q: BTreeMap<String, Quantity>| (!q.is_empty()).then_some(q);
    let requests = non_empty(resources::pod_aggregate(pod, false));
    status.resources = Some(ResourceRequirements {
        requests: requests.clone(),
        limits: non_empty(resources::pod_aggregate(pod, true)),
        ..Default::default()
    });
    status.allocated_resources = requests;
    status
}

fn container_status(input: &Input, kind: Kind, c: &Container) -> ContainerStatus {
    let default = ContainerObs::default();
    let o = input.obs.containers.get(&c.name).unwrap_or(&default);
    let pod = input.pod;
    let has_init = pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|i| !i.is_empty());
    let terminated = |e: &Exit| ContainerState {
        terminated: Some(terminated(e, o.container_id.as_deref())),
        ..Default::default()
    };
    let waiting = |reason: &str, message: Option<String>| ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.to_string()),
            message,
        }),
        ..Default::default()
    };
    let reported_waiting = o
        .waiting
        .as_ref()
        .map(|w| waiting(&w.reason, Some(w.message.clone())));
    let (state, last) = match &o.state {
        Attempt::None => {
            let default = if has_init {
                "PodInitializing"
            } else {
                "ContainerCreating"
            };
            (
                reported_waiting.unwrap_or_else(|| waiting(default, None)),
                None,
            )
        }
        Attempt::Running { started_at } => {
            let running = ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(time(*started_at)),
                }),
                ..Default::default()
            };
            (running, o.last_exit.as_ref().map(terminated))
        }
        Attempt::Exited(e) => {
            let restarts = input.state < PodState::Terminating
                && machine::wants_restart(RestartPolicy::of(pod), kind, e);
            let backoff = o.backoff.filter(|w| w.until > input.obs.now);
            match (restarts, reported_waiting, backoff) {
                (true, Some(w), _) => (w, Some(terminated(e))),
                (true, None, Some(w)) => {
                    let msg = format!(
                        "back-off {} restarting failed container={} pod={}",
                        super::backoff::go_duration(w.delay),
                        c.name,
                        super::format_pod(pod),
                    );
                    (waiting("CrashLoopBackOff", Some(msg)), Some(terminated(e)))
                }
                _ => (terminated(e), o.last_exit.as_ref().map(terminated)),
            }
        }
    };
    let running = o.running();
    // A regular init container that exited 0 is ready under every policy (the prober
    // manager's rule); sidecars and app containers are ready while running and probed ready.
    let init_done = kind == Kind::Init && matches!(&o.state, Attempt::Exited(e) if e.code == 0);
    ContainerStatus {
        name: c.name.clone(),
        image: o
            .image
            .clone()
            .or_else(|| c.image.clone())
            .unwrap_or_default(),
        image_id: o.image_id.clone().unwrap_or_default(),
        container_id: o
            .container_id
            .as_ref()
            .map(|id| format!("containerd://{id}")),
        restart_count: o.attempt as i32,
        // Ephemeral containers have no readiness (the kubelet's prober never marks them).
        ready: kind != Kind::Ephemeral && ((running && o.ready) || init_done),
        started: Some(running && o.started),
        state: Some(state),
        last_state: Some(last.unwrap_or_default()),
        volume_mounts: volume_mounts(c),
        resources: (o.state != Attempt::None).then(|| runtime_resources(c)),
        allocated_resources: (o.state != Attempt::None).then(|| allocated(c)).flatten(),
        ..Default::default()
    }
}

/// The container's volume mounts as the kubelet reports them (RecursiveReadOnlyMounts): name,
/// path, readOnly, and for a read-only mount `recursiveReadOnly: Disabled` (the agent makes no
/// recursive read-only mounts).
fn volume_mounts(c: &Container) -> Option<Vec<VolumeMountStatus>> {
    let mounts = c.volume_mounts.as_ref().filter(|m| !m.is_empty())?;
    let status = mounts.iter().map(|m| {
        let read_only = m.read_only.filter(|r| *r);
        VolumeMountStatus {
            name: m.name.clone(),
            mount_path: m.mount_path.clone(),
            read_only,
            recursive_read_only: read_only.map(|_| "Disabled".to_string()),
        }
    });
    Some(status.collect())
}

/// The resources of a container the runtime has, running or exited (InPlacePodVerticalScaling):
/// the allocated ones, here the spec's, all of them (`{}` when it sets none). For a running
/// container the kubelet reads cpu and memory back from the runtime, which holds what the
/// agent set from the same spec.
fn runtime_resources(c: &Container) -> ResourceRequirements {
    c.resources.clone().unwrap_or_default()
}

/// The container's allocated resources: its requests (written for every container the runtime
/// has, running or not).
fn allocated(c: &Container) -> Option<BTreeMap<String, Quantity>> {
    c.resources.as_ref()?.requests.clone()
}

fn terminated(e: &Exit, id: Option<&str>) -> ContainerStateTerminated {
    let reason = match (e.oom_killed, e.code) {
        _ if e.start_error => "StartError",
        (true, _) => "OOMKilled",
        (false, 0) => "Completed",
        _ => "Error",
    };
    ContainerStateTerminated {
        exit_code: e.code,
        signal: None,
        reason: Some(reason.to_string()),
        message: e.message.clone().filter(|m| !m.is_empty()),
        // A start that never ran has started_at 0 in the CRI: the kubelet writes the epoch.
        started_at: Some(time(e.started_at.unwrap_or(SystemTime::UNIX_EPOCH))),
        finished_at: Some(time(e.finished_at)),
        container_id: id.map(|id| format!("containerd://{id}")),
    }
}

fn is_running(s: &ContainerStatus) -> bool {
    s.state.as_ref().is_some_and(|st| st.running.is_some())
}

fn terminated_state(s: &ContainerStatus) -> Option<&ContainerStateTerminated> {
    s.state.as_ref().and_then(|st| st.terminated.as_ref())
}

fn last_terminated(s: &ContainerStatus) -> Option<&ContainerStateTerminated> {
    s.last_state.as_ref().and_then(|st| st.terminated.as_ref())
}

/// The kubelet's getPhase, then deadline, stickiness and the hold until containers stopped.
fn phase_of(
    input: &Input,
    all: &[(Kind, &Container)],
    init: &[ContainerStatus],
    apps: &[ContainerStatus],
    terminal: bool,
) -> (Phase, Option<String>, Option<String>) {
    let policy = RestartPolicy::of(input.pod);
    let kinds = all.iter().map(|(k, _)| *k);
    let mut pending_init = 0;
    let mut failed_init = 0;
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for (kind, s) in kinds.clone().zip(init) {
        let waiting_state = s.state.as_ref().is_some_and(|st| st.waiting.is_some());
        match kind {
            Kind::Init => match terminated_state(s) {
                Some(t) if t.exit_code != 0 => failed_init += 1,
                Some(_) => {}
                None if waiting_state && last_terminated(s).is_some_and(|t| t.exit_code != 0) => {
                    failed_init += 1
                }
                None if waiting_state && last_terminated(s).is_some() => {}
                None => pending_init += 1,
            },
            _ if is_running(s) => {
                running += 1;
                if s.started != Some(true) {
                    pending_init += 1;
                }
            }
            _ if waiting_state && last_terminated(s).is_none() => {
                pending_init += 1;
                waiting += 1;
            }
            _ => {}
        }
    }
    for s in apps {
        if is_running(s) {
            running += 1;
        } else if let Some(t) = terminated_state(s) {
            stopped += 1;
            succeeded += (t.exit_code == 0) as i32;
        } else if last_terminated(s).is_some() {
            stopped += 1;
        } else {
            waiting += 1;
        }
    }
    let any_app_started = apps
        .iter()
        .any(|s| is_running(s) || terminated_state(s).is_some() || last_terminated(s).is_some());
    let mut phase = if failed_init > 0 && policy == RestartPolicy::Never {
        Phase::Failed
    } else if (pending_init > 0 && !any_app_started) || waiting > 0 {
        Phase::Pending
    } else if running > 0 {
        Phase::Running
    } else if stopped == 0 {
        Phase::Pending
    } else if terminal || policy != RestartPolicy::Always && stopped == succeeded {
        if stopped == succeeded {
            Phase::Succeeded
        } else {
            Phase::Failed
        }
    } else if policy == RestartPolicy::Never {
        Phase::Failed
    } else {
        Phase::Running
    };
    let mut reason = None;
    let mut message = None;
    if matches!(input.obs.terminating, Some((_, Why::DeadlineExceeded))) {
        phase = Phase::Failed;
        reason = Some("DeadlineExceeded".to_string());
        message = Some("Pod was active on the node longer than the specified deadline".into());
    }
    let previous = input.previous;
    let prev_phase = Phase::of(previous);
    let api_phase = Phase::of(input.pod.status.as_ref());
    if !phase.is_terminal() {
        if let Some(p) = [prev_phase, api_phase]
            .into_iter()
            .flatten()
            .find(|p| p.is_terminal())
        {
            phase = p;
        }
    } else if !terminal {
        // Not terminal until every container has stopped.
        phase = prev_phase
            .filter(|p| !p.is_terminal())
            .unwrap_or(Phase::Running);
        reason = None;
        message = None;
    }
    if reason.is_none() && prev_phase == Some(phase) {
        reason = previous.and_then(|p| p.reason.clone());
        message = previous.and_then(|p| p.message.clone());
    }
    (phase, reason, message)
}

fn conditions(input: &Input, phase: Phase, status: &PodStatus) -> Vec<PodCondition> {
    let pod = input.pod;
    let generation = pod.metadata.generation;
    let now = time(input.obs.now);
    let previous = input.previous.and_then(|p| p.conditions.as_ref());
    let mut out: Vec<PodCondition> = foreign_conditions(pod).cloned().collect();
    let init = status
        .init_container_statuses
        .as_deref()
        .unwrap_or_default();
    let apps = status.container_statuses.as_deref().unwrap_or_default();
    let owned = [
        (
            "PodReadyToStartContainers",
            (input.obs.sandbox_ready, None, None),
        ),
        ("Initialized", initialized(pod, phase, init, apps)),
        ("Ready", ready(pod, phase, init, apps)),
        ("ContainersReady", containers_ready(phase, pod, init, apps)),
        ("PodScheduled", (true, None, None)),
    ];
    out.reserve_exact(owned.len());
    for (kind, (ok, reason, message)) in owned {
        let status = if ok { "True" } else { "False" }.to_string();
        let last = previous
            .and_then(|p| p.iter().find(|c| c.type_ == kind))
            .filter(|c| c.status == status)
            .and_then(|c| c.last_transition_time.clone());
        out.push(PodCondition {
            type_: kind.to_string(),
            status,
            reason,
            message,
            last_transition_time: Some(last.unwrap_or_else(|| now.clone())),
            observed_generation: generation,
            last_probe_time: None,
        });
    }
    out
}

fn foreign_conditions(pod: &Pod) -> impl Iterator<Item = &PodCondition> {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| !OWNED.contains(&c.type_.as_str()))
}

type Cond = (bool, Option<String>, Option<String>);

fn initialized(
    pod: &Pod,
    phase: Phase,
    init: &[ContainerStatus],
    apps: &[ContainerStatus],
) -> Cond {
    let all = machine::containers(pod);
    let specs: Vec<_> = all.iter().filter(|(k, _)| *k != Kind::App).collect();
    if phase == Phase::Succeeded {
        return (true, Some("PodCompleted".into()), None);
    }
    if specs.is_empty() {
        return (true, None, None);
    }
    let app_started = apps
        .iter()
        .any(|s| is_running(s) || terminated_state(s).is_some() || last_terminated(s).is_some());
    if app_started {
        return (true, None, None);
    }
    let incomplete: Vec<&str> = specs
        .iter()
        .zip(init)
        .filter(|((kind, _), s)| match kind {
            Kind::Sidecar => s.started != Some(true),
            _ => terminated_state(s).is_none_or(|t| t.exit_code != 0),
        })
        .map(|((_, c), _)| c.name.as_str())
        .collect();
    if incomplete.is_empty() {
        return (true, None, None);
    }
    (
        false,
        Some("ContainersNotInitialized".into()),
        Some(format!(
            "containers with incomplete status: [{}]",
            incomplete.join(" ")
        )),
    )
}

fn containers_ready(
    phase: Phase,
    pod: &Pod,
    init: &[ContainerStatus],
    apps: &[ContainerStatus],
) -> Cond {
    match phase {
        Phase::Succeeded => return (false, Some("PodCompleted".into()), None),
        Phase::Failed => return (false, Some("PodFailed".into()), None),
        _ => {}
    }
    let sidecars = machine::containers(pod)
        .into_iter()
        .filter(|(k, _)| *k != Kind::App)
        .zip(init)
        .filter(|((k, _), _)| *k == Kind::Sidecar)
        .map(|(_, s)| s);
    let unready: Vec<&str> = sidecars
        .chain(apps)
        .filter(|s| !s.ready)
        .map(|s| s.name.as_str())
        .collect();
    if unready.is_empty() {
        return (true, None, None);
    }
    (
        false,
        Some("ContainersNotReady".into()),
        Some(format!(
            "containers with unready status: [{}]",
            unready.join(" ")
        )),
    )
}

fn ready(pod: &Pod, phase: Phase, init: &[ContainerStatus], apps: &[ContainerStatus]) -> Cond {
    let cr = containers_ready(phase, pod, init, apps);
    if !cr.0 {
        return cr;
    }
    let gates = pod
        .spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .into_iter()
        .flatten();
    let unmet: Vec<String> = gates
        .filter_map(|g| {
            let kind = &g.condition_type;
            match foreign_conditions(pod).find(|c| &c.type_ == kind) {
                None => Some(format!(
                    "corresponding condition of pod readiness gate \"{kind}\" does not exist."
                )),
                Some(c) if c.status != "True" => Some(format!(
                    "the status of pod readiness gate \"{kind}\" is not \"True\", but {}",
                    c.status
                )),
                Some(_) => None,
            }
        })
        .collect();
    if unmet.is_empty() {
        return (true, None, None);
    }
    (
        false,
        Some("ReadinessGatesNotReady".into()),
        Some(unmet.join(", ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::backoff::Window;
    use crate::pod::machine::Waiting;
    use k8s_openapi::api::core::v1::{PodReadinessGate, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::time::Duration;

    const T0: u64 = 1_700_000_000;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + secs)
    }

    fn c(name: &str) -> Container {
        Container {
            name: name.into(),
            image: Some("busybox".into()),
            ..Default::default()
        }
    }

    fn pod(policy: &str, init: Vec<Container>, apps: Vec<Container>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("u1".into()),
                generation: Some(3),
                ..Default::default()
            },
            spec: Some(PodSpec {
                restart_policy: Some(policy.into()),
                init_containers: Some(init),
                containers: apps,
                ..Default::default()
            }),
            status: None,
        }
    }

    fn obs(items: &[(&str, ContainerObs)]) -> Observed {
        Observed {
            now: t(100),
            state: PodState::Syncing,
            start_time: Some(t(0)),
            sandbox_ready: true,
            volumes_ready: true,
            containers: items
                .iter()
                .map(|(n, o)| (n.to_string(), o.clone()))
                .collect(),
            ..Default::default()
        }
    }

    fn running(ready: bool) -> ContainerObs {
        ContainerObs {
            state: Attempt::Running { started_at: t(10) },
            started: true,
            ready,
            container_id: Some("abc".into()),
            image_id: Some("busybox@sha256:1".into()),
            ..Default::default()
        }
    }

    fn exit(code: i32) -> Exit {
        Exit {
            code,
            oom_killed: false,
            start_error: false,
            started_at: Some(t(10)),
            finished_at: t(20),
            message: None,
        }
    }

    fn exited(attempt: u32, code: i32) -> ContainerObs {
        ContainerObs {
            attempt,
            state: Attempt::Exited(exit(code)),
            ..Default::default()
        }
    }

    fn run(p: &Pod, o: &Observed, state: PodState, prev: Option<&PodStatus>) -> PodStatus {
        compute(&Input {
            pod: p,
            previous: prev,
            obs: o,
            state,
            node_ip: Some("192.0.2.1".parse().unwrap()),
            pod_ip: Some("10.233.0.5".parse().unwrap()),
        })
    }

    fn cond<'a>(s: &'a PodStatus, kind: &str) -> &'a PodCondition {
        s.conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == kind)
            .unwrap()
    }

    fn app<'a>(s: &'a PodStatus, name: &str) -> &'a ContainerStatus {
        s.container_statuses
            .as_ref()
            .unwrap()
            .iter()
            .chain(s.init_container_statuses.iter().flatten())
            .find(|c| c.name == name)
            .unwrap()
    }

    fn waiting_reason(s: &ContainerStatus) -> Option<&str> {
        s.state.as_ref()?.waiting.as_ref()?.reason.as_deref()
    }

    #[test]
    fn new_pod_is_pending_container_creating() {
        let p = pod("Always", vec![], vec![c("app")]);
        let s = run(&p, &obs(&[]), PodState::Syncing, None);
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        assert_eq!(waiting_reason(app(&s, "app")), Some("ContainerCreating"));
        assert_eq!(cond(&s, "ContainersReady").status, "False");
        assert_eq!(cond(&s, "PodScheduled").status, "True");
        assert_eq!(cond(&s, "Initialized").status, "True");
        assert_eq!(s.qos_class.as_deref(), Some("BestEffort"));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.pod_ip.as_deref(), Some("10.233.0.5"));
        assert_eq!(s.host_ip.as_deref(), Some("192.0.2.1"));
        assert_eq!(s.start_time, Some(time(t(0))));
    }

    #[test]
    fn init_pending_reports_pod_initializing() {
        let p = pod("Always", vec![c("i1")], vec![c("app")]);
        let s = run(&p, &obs(&[("i1", running(false))]), PodState::Syncing, None);
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        assert_eq!(waiting_reason(app(&s, "app")), Some("PodInitializing"));
        let init = cond(&s, "Initialized");
        assert_eq!(init.status, "False");
        assert_eq!(init.reason.as_deref(), Some("ContainersNotInitialized"));
        assert_eq!(
            init.message.as_deref(),
            Some("containers with incomplete status: [i1]")
        );
    }

    #[test]
    fn running_and_ready() {
        let p = pod("Always", vec![c("i1")], vec![c("app")]);
        let o = obs(&[("i1", exited(0, 0)), ("app", running(true))]);
        let s = run(&p, &o, PodState::Syncing, None);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(cond(&s, "Initialized").status, "True");
        assert_eq!(cond(&s, "ContainersReady").status, "True");
        assert_eq!(cond(&s, "Ready").status, "True");
        let a = app(&s, "app");
        assert!(a.ready);
        assert_eq!(a.started, Some(true));
        assert_eq!(a.container_id.as_deref(), Some("containerd://abc"));
        assert_eq!(a.image_id, "busybox@sha256:1");
        let i = app(&s, "i1");
        let term = i.state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(term.reason.as_deref(), Some("Completed"));
    }

    #[test]
    fn unready_container_named_in_message() {
        let p = pod("Always", vec![], vec![c("a"), c("b")]);
        let o = obs(&[("a", running(true)), ("b", running(false))]);
        let s = run(&p, &o, PodState::Syncing, None);
        let cr = cond(&s, "ContainersReady");
        assert_eq!(cr.reason.as_deref(), Some("ContainersNotReady"));
        assert_eq!(
            cr.message.as_deref(),
            Some("containers with unready status: [b]")
        );
        assert_eq!(cond(&s, "Ready").status, "False");
    }

    #[test]
    fn readiness_gates() {
        let mut p = pod("Always", vec![], vec![c("a")]);
        p.spec.as_mut().unwrap().readiness_gates = Some(vec![PodReadinessGate {
            condition_type: "example.com/lb".into(),
        }]);
        let o = obs(&[("a", running(true))]);
        let s = run(&p, &o, PodState::Syncing, None);
        let r = cond(&s, "Ready");
        assert_eq!(r.status, "False");
        assert_eq!(r.reason.as_deref(), Some("ReadinessGatesNotReady"));
        assert_eq!(
            r.message.as_deref(),
            Some(
                "corresponding condition of pod readiness gate \"example.com/lb\" does not exist."
            )
        );
        p.status = Some(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "example.com/lb".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let s = run(&p, &o, PodState::Syncing, None);
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "example.com/lb").status, "True");
    }

    #[test]
    fn transition_time_moves_only_on_change() {
        let p = pod("Always", vec![], vec![c("a")]);
        let mut o = obs(&[("a", running(false))]);
        let first = run(&p, &o, PodState::Syncing, None);
        o.now = t(200);
        let same = run(&p, &o, PodState::Syncing, Some(&first));
        assert_eq!(
            cond(&same, "Ready").last_transition_time,
            Some(time(t(100)))
        );
        o.containers.get_mut("a").unwrap().ready = true;
        let changed = run(&p, &o, PodState::Syncing, Some(&same));
        assert_eq!(
            cond(&changed, "Ready").last_transition_time,
            Some(time(t(200)))
        );
        assert_eq!(
            cond(&changed, "PodScheduled").last_transition_time,
            Some(time(t(100)))
        );
    }

    #[test]
    fn statuses_carry_volume_mounts_and_resources_of_created_containers() {
        use k8s_openapi::api::core::v1::{ResourceRequirements, VolumeMount};
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let q = |v: &str| Quantity(v.into());
        let mut app_spec = c("a");
        app_spec.volume_mounts = Some(vec![
            VolumeMount {
                name: "data".into(),
                mount_path: "/data".into(),
                ..Default::default()
            },
            VolumeMount {
                name: "conf".into(),
                mount_path: "/conf".into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]);
        app_spec.resources = Some(ResourceRequirements {
            requests: Some([("cpu".to_string(), q("250m"))].into()),
            limits: Some([("memory".to_string(), q("64Mi"))].into()),
            ..Default::default()
        });
        let p = pod("Always", vec![], vec![app_spec, c("b")]);
        let s = run(&p, &obs(&[("a", running(true))]), PodState::Syncing, None);
        let a = app(&s, "a");
        let mounts = a.volume_mounts.as_ref().unwrap();
        assert_eq!(mounts.len(), 2);
        assert_eq!(
            (mounts[0].name.as_str(), mounts[0].mount_path.as_str()),
            ("data", "/data")
        );
        assert_eq!(
            (
                mounts[0].read_only,
                mounts[0].recursive_read_only.as_deref()
            ),
            (None, None)
        );
        assert_eq!(mounts[1].read_only, Some(true));
        assert_eq!(mounts[1].recursive_read_only.as_deref(), Some("Disabled"));
        let r = a.resources.as_ref().unwrap();
        assert_eq!(r.requests.as_ref().unwrap()["cpu"], q("250m"));
        assert_eq!(r.limits.as_ref().unwrap()["memory"], q("64Mi"));
        assert_eq!(a.allocated_resources.as_ref().unwrap()["cpu"], q("250m"));
        // A container with no mounts and no resources, never created: neither is written.
        let b = app(&s, "b");
        assert_eq!(
            (b.volume_mounts.as_ref(), b.resources.as_ref()),
            (None, None)
        );
        assert_eq!(b.allocated_resources, None);
        // Once created, it has resources `{}` (the kubelet's copy of an empty spec).
        let s = run(&p, &obs(&[("b", running(true))]), PodState::Syncing, None);
        let b = app(&s, "b");
        assert_eq!(b.resources, Some(ResourceRequirements::default()));
        assert_eq!(b.allocated_resources, None);
        // An exited container keeps its resources and allocated resources.
        let s = run(&p, &obs(&[("a", exited(0, 1))]), PodState::Syncing, None);
        let a = app(&s, "a");
        assert_eq!(
            a.resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .unwrap()["memory"],
            q("64Mi")
        );
        assert_eq!(a.allocated_resources.as_ref().unwrap()["cpu"], q("250m"));
    }

    #[test]
    fn pod_status_carries_its_aggregated_resources() {
        use k8s_openapi::api::core::v1::ResourceRequirements;
        let q = |v: &str| Quantity(v.into());
        let p = pod("Always", vec![], vec![c("a")]);
        let s = run(&p, &obs(&[]), PodState::Syncing, None);
        assert_eq!(
            s.resources,
            Some(ResourceRequirements::default()),
            "{{}} for none"
        );
        assert_eq!(s.allocated_resources, None);
        let mut limited = c("a");
        limited.resources = Some(ResourceRequirements {
            requests: Some([("memory".to_string(), q("20Mi"))].into()),
            limits: Some([("memory".to_string(), q("20Mi"))].into()),
            ..Default::default()
        });
        let p = pod("Always", vec![], vec![limited, c("b")]);
        let s = run(&p, &obs(&[]), PodState::Syncing, None);
        let r = s.resources.unwrap();
        assert_eq!(r.requests.unwrap()["memory"], q("20Mi"));
        assert_eq!(r.limits.unwrap()["memory"], q("20Mi"));
        assert_eq!(s.allocated_resources.unwrap()["memory"], q("20Mi"));
    }

    #[test]
    fn crash_loop_back_off_prints_the_delay_as_go_does() {
        let p = pod("Always", vec![], vec![c("app")]);
        for (delay, text) in [(80, "1m20s"), (300, "5m0s"), (10, "10s")] {
            let mut o = exited(2, 1);
            o.backoff = Some(Window {
                until: t(1000),
                delay: Duration::from_secs(delay),
            });
            let s = run(&p, &obs(&[("app", o)]), PodState::Syncing, None);
            let w = app(&s, "app").state.clone().unwrap().waiting.unwrap();
            assert_eq!(
                w.message.unwrap(),
                format!("back-off {text} restarting failed container=app pod=web_default(u1)")
            );
        }
    }

    #[test]
    fn crash_loop_back_off_waiting_with_last_state() {
        let p = pod("Always", vec![], vec![c("app")]);
        let mut o = exited(2, 1);
        o.backoff = Some(Window {
            until: t(130),
            delay: Duration::from_secs(20),
        });
        let s = run(&p, &obs(&[("app", o)]), PodState::Syncing, None);
        let a = app(&s, "app");
        assert_eq!(waiting_reason(a), Some("CrashLoopBackOff"));
        assert_eq!(
            a.state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .message
                .as_deref(),
            Some("back-off 20s restarting failed container=app pod=web_default(u1)")
        );
        assert_eq!(last_terminated(a).unwrap().exit_code, 1);
        assert_eq!(a.restart_count, 2);
        assert_eq!(s.phase.as_deref(), Some("Running"));
    }

    #[test]
    fn worker_waiting_reason_is_reported() {
        let p = pod("Always", vec![], vec![c("app")]);
        let o = ContainerObs {
            waiting: Some(Waiting {
                reason: "ErrImagePull".into(),
                message: "not found".into(),
            }),
            ..Default::default()
        };
        let s = run(&p, &obs(&[("app", o)]), PodState::Syncing, None);
        assert_eq!(waiting_reason(app(&s, "app")), Some("ErrImagePull"));
        assert_eq!(s.phase.as_deref(), Some("Pending"));
    }

    #[test]
    fn terminated_reasons_and_signal() {
        let p = pod("Never", vec![], vec![c("a"), c("b"), c("c"), c("d")]);
        let mut oom = exited(0, 137);
        if let Attempt::Exited(e) = &mut oom.state {
            e.oom_killed = true;
            e.message = Some("bye".into());
        }
        let mut never_ran = exited(0, 128);
        if let Attempt::Exited(e) = &mut never_ran.state {
            e.start_error = true;
            e.started_at = None;
        }
        let o = obs(&[
            ("a", exited(0, 0)),
            ("b", exited(0, 143)),
            ("c", oom),
            ("d", never_ran),
        ]);
        let s = run(&p, &o, PodState::Terminated, None);
        let term = |n| app(&s, n).state.clone().unwrap().terminated.unwrap();
        assert_eq!(term("a").reason.as_deref(), Some("Completed"));
        assert_eq!(term("a").signal, None);
        assert_eq!(term("b").reason.as_deref(), Some("Error"));
        // exit(143) is an exit code; the kubelet invents no signal from it.
        assert_eq!(term("b").signal, None);
        assert_eq!(term("c").reason.as_deref(), Some("OOMKilled"));
        assert_eq!(term("c").message.as_deref(), Some("bye"));
        assert_eq!(term("c").started_at, Some(time(t(10))));
        assert_eq!(term("c").finished_at, Some(time(t(20))));
        assert_eq!(term("d").reason.as_deref(), Some("StartError"));
        // Never started: containerd's CRI reports started_at 0, the kubelet writes the epoch.
        assert_eq!(
            (term("d").exit_code, term("d").started_at),
            (128, Some(time(SystemTime::UNIX_EPOCH)))
        );
        assert_eq!(s.phase.as_deref(), Some("Failed"));
    }

    #[test]
    fn succeeded_only_once_terminated() {
        let p = pod("Never", vec![], vec![c("a")]);
        let o = obs(&[("a", exited(0, 0))]);
        let held = run(&p, &o, PodState::Terminating, None);
        assert_eq!(held.phase.as_deref(), Some("Running"));
        let done = run(&p, &o, PodState::Terminated, Some(&held));
        assert_eq!(done.phase.as_deref(), Some("Succeeded"));
        assert_eq!(cond(&done, "Ready").reason.as_deref(), Some("PodCompleted"));
        assert_eq!(cond(&done, "Initialized").status, "True");
    }

    #[test]
    fn on_failure_success_is_succeeded() {
        let p = pod("OnFailure", vec![], vec![c("a")]);
        let o = obs(&[("a", exited(0, 0))]);
        let s = run(&p, &o, PodState::Terminated, None);
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
    }

    #[test]
    fn deleted_always_pod_killed_is_failed() {
        let p = pod("Always", vec![], vec![c("a")]);
        let mut o = obs(&[("a", exited(0, 143))]);
        o.terminating = Some((t(50), Why::Deleted));
        let s = run(&p, &o, PodState::Terminated, None);
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        let a = app(&s, "a");
        assert!(a.state.as_ref().unwrap().terminated.is_some());
    }

    #[test]
    fn sidecar_does_not_count_for_phase() {
        let p = pod(
            "Never",
            vec![Container {
                restart_policy: Some("Always".into()),
                ..c("side")
            }],
            vec![c("a")],
        );
        let o = obs(&[("side", exited(0, 143)), ("a", exited(0, 0))]);
        let s = run(&p, &o, PodState::Terminated, None);
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
    }

    #[test]
    fn failed_init_under_never_is_failed_once_stopped() {
        let p = pod("Never", vec![c("i1")], vec![c("a")]);
        let o = obs(&[("i1", exited(0, 1))]);
        let s = run(&p, &o, PodState::Terminated, None);
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        assert_eq!(waiting_reason(app(&s, "a")), Some("PodInitializing"));
    }

    #[test]
    fn failed_second_init_under_never_names_it_incomplete() {
        let p = pod("Never", vec![c("init1"), c("init2")], vec![c("a")]);
        let o = obs(&[("init1", exited(0, 0)), ("init2", exited(0, 1))]);
        let s = run(&p, &o, PodState::Terminated, None);
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        let init = cond(&s, "Initialized");
        assert_eq!(init.status, "False");
        assert_eq!(init.reason.as_deref(), Some("ContainersNotInitialized"));
        assert_eq!(
            init.message.as_deref(),
            Some("containers with incomplete status: [init2]")
        );
        assert_eq!(waiting_reason(app(&s, "a")), Some("PodInitializing"));
        assert!(app(&s, "init1").ready);
        assert!(!app(&s, "init2").ready);
    }

    #[test]
    fn init_container_that_exited_zero_is_ready_under_every_policy() {
        for policy in ["Always", "OnFailure", "Never"] {
            let p = pod(policy, vec![c("i1")], vec![c("a")]);
            let o = obs(&[("i1", exited(0, 0)), ("a", running(false))]);
            let s = run(&p, &o, PodState::Syncing, None);
            assert!(app(&s, "i1").ready, "{policy}");
            assert_eq!(app(&s, "i1").started, Some(false), "{policy}");
        }
    }

    #[test]
    fn sidecar_keeps_probe_readiness() {
        let side = Container {
            restart_policy: Some("Always".into()),
            ..c("side")
        };
        let p = pod("Always", vec![side], vec![c("a")]);
        let o = obs(&[("side", running(false)), ("a", running(true))]);
        let s = run(&p, &o, PodState::Syncing, None);
        assert!(!app(&s, "side").ready);
        let o = obs(&[("side", running(true)), ("a", running(true))]);
        assert!(app(&run(&p, &o, PodState::Syncing, None), "side").ready);
    }

    #[test]
    fn succeeded_pod_without_init_containers_is_initialized_pod_completed() {
        let p = pod("Never", vec![], vec![c("a")]);
        let o = obs(&[("a", exited(0, 0))]);
        let s = run(&p, &o, PodState::Terminated, None);
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        let init = cond(&s, "Initialized");
        assert_eq!(init.status, "True");
        assert_eq!(init.reason.as_deref(), Some("PodCompleted"));
    }

    #[test]
    fn deadline_exceeded_reason() {
        let p = pod("Always", vec![], vec![c("a")]);
        let mut o = obs(&[("a", running(true))]);
        o.terminating = Some((t(50), Why::DeadlineExceeded));
        let held = run(&p, &o, PodState::Terminating, None);
        assert_eq!(held.phase.as_deref(), Some("Running"));
        o.containers.insert("a".into(), exited(0, 137));
        let s = run(&p, &o, PodState::Terminated, Some(&held));
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        assert_eq!(s.reason.as_deref(), Some("DeadlineExceeded"));
    }

    #[test]
    fn terminal_phase_is_sticky() {
        let p = pod("Never", vec![], vec![c("a")]);
        let prev = PodStatus {
            phase: Some("Succeeded".into()),
            ..Default::default()
        };
        let s = run(&p, &obs(&[]), PodState::Syncing, Some(&prev));
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
    }

    #[test]
    fn host_network_reports_node_ip() {
        let mut p = pod("Always", vec![], vec![c("a")]);
        p.spec.as_mut().unwrap().host_network = Some(true);
        let s = run(&p, &obs(&[]), PodState::Syncing, None);
        assert_eq!(s.pod_ip.as_deref(), Some("192.0.2.1"));
        assert_eq!(s.pod_ips.unwrap()[0].ip, "192.0.2.1");
    }

    #[test]
    fn sandbox_gone_clears_ready_to_start() {
        let p = pod("Always", vec![], vec![c("a")]);
        let mut o = obs(&[]);
        o.sandbox_ready = false;
        let s = run(&p, &o, PodState::Pending, None);
        assert_eq!(cond(&s, "PodReadyToStartContainers").status, "False");
    }

    #[test]
    fn sidecar_not_started_keeps_pod_initializing() {
        let p = pod(
            "Always",
            vec![Container {
                restart_policy: Some("Always".into()),
                ..c("side")
            }],
            vec![c("a")],
        );
        let mut side = running(false);
        side.started = false;
        let s = run(&p, &obs(&[("side", side)]), PodState::Syncing, None);
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        assert_eq!(
            cond(&s, "Initialized").message.as_deref(),
            Some("containers with incomplete status: [side]")
        );
        assert_eq!(app(&s, "side").started, Some(false));
    }
}
