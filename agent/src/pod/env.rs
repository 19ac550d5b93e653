//! Container environment: env and envFrom resolved against the object store (ConfigMaps,
//! Secrets) and the downward API (fieldRef, resourceFieldRef), and `$(VAR)` expansion for
//! command, args and env values, as the kubelet does.
//!
//! OWNER: volumes helper (shares field resolution with the downwardAPI volume).

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::store::ObjectStore;

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// A non-optional ConfigMap/Secret or key is missing: CreateContainerConfigError.
    #[error("{kind} {name:?} {detail}")]
    Missing {
        kind: &'static str,
        name: String,
        detail: String,
    },
    /// An unsupported or malformed field path.
    #[error("{0}")]
    Invalid(String),
}

/// The container's environment in order (envFrom first, then env), values expanded.
pub fn container_env(
    _pod: &Pod,
    _container: &Container,
    _store: &ObjectStore,
) -> Result<Vec<(String, String)>, EnvError> {
    todo!()
}

/// `$(VAR)` expansion with `$$` escaping, for command and args.
pub fn expand(_input: &str, _env: &[(String, String)]) -> String {
    todo!()
}
