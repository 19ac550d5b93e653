//! The API's enumerated pod fields as types: a pod's `status.phase` and its (or an init
//! container's) `restartPolicy`. The API's strings are read here and written here, nowhere
//! else; the rest of the agent matches on the enums.
//!
//! Unknown values: the API server refuses them, and so does the manifest validation
//! (`source::validation`, with upstream's messages) for pods that meet no API server, so an
//! unknown `restartPolicy` never reaches a worker; were one to, it reads as the API's default.

use k8s_openapi::api::core::v1::{Container, Pod, PodStatus};

/// A pod's `status.phase` (the API's deprecated `Unknown` is never written by a kubelet).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl Phase {
    /// The API's string.
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }

    /// The phase an API string names (None for `Unknown` or anything else).
    pub fn parse(s: &str) -> Option<Phase> {
        [
            Phase::Pending,
            Phase::Running,
            Phase::Succeeded,
            Phase::Failed,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }

    /// The phase a status reports: None when unset, Pending for a value the agent does not know
    /// (as the kubelet treats a phase it did not compute).
    pub fn of(status: Option<&PodStatus>) -> Option<Phase> {
        let s = status?.phase.as_deref()?;
        Some(Phase::parse(s).unwrap_or(Phase::Pending))
    }

    /// Succeeded or Failed: the pod never runs again.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pod's `restartPolicy`, or an init container's (where only `Always`, a sidecar, is acted on).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// Every value, in the order upstream's pod validation lists them.
    pub const ALL: [RestartPolicy; 3] = [
        RestartPolicy::Always,
        RestartPolicy::OnFailure,
        RestartPolicy::Never,
    ];

    /// The API's string.
    pub const fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "Always",
            RestartPolicy::OnFailure => "OnFailure",
            RestartPolicy::Never => "Never",
        }
    }

    /// The policy an API string names (None for anything else).
    pub fn parse(s: &str) -> Option<RestartPolicy> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// The pod's restartPolicy: Always when unset (the API's default) or unknown (see the
    /// module doc: validation refuses those before a worker sees the pod).
    pub fn of(pod: &Pod) -> RestartPolicy {
        pod.spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .and_then(RestartPolicy::parse)
            .unwrap_or(RestartPolicy::Always)
    }

    /// A container's own restartPolicy (None when unset or unknown).
    pub fn of_container(container: &Container) -> Option<RestartPolicy> {
        container
            .restart_policy
            .as_deref()
            .and_then(RestartPolicy::parse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;

    #[test]
    fn strings_round_trip_and_unknown_ones_are_refused() {
        for p in [
            Phase::Pending,
            Phase::Running,
            Phase::Succeeded,
            Phase::Failed,
        ] {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
        assert_eq!(Phase::parse("Unknown"), None);
        for p in RestartPolicy::ALL {
            assert_eq!(RestartPolicy::parse(p.as_str()), Some(p));
        }
        assert_eq!(RestartPolicy::parse("always"), None);
        assert_eq!(RestartPolicy::parse(""), None);
    }

    #[test]
    fn an_unset_policy_is_always_and_an_unknown_phase_is_pending() {
        let pod = |policy: Option<&str>| Pod {
            spec: Some(PodSpec {
                restart_policy: policy.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(RestartPolicy::of(&pod(None)), RestartPolicy::Always);
        assert_eq!(RestartPolicy::of(&pod(Some("Never"))), RestartPolicy::Never);
        let status = |phase: Option<&str>| PodStatus {
            phase: phase.map(Into::into),
            ..Default::default()
        };
        assert_eq!(Phase::of(Some(&status(None))), None);
        assert_eq!(
            Phase::of(Some(&status(Some("Failed")))),
            Some(Phase::Failed)
        );
        assert_eq!(
            Phase::of(Some(&status(Some("Unknown")))),
            Some(Phase::Pending)
        );
    }
}
