//! The API server's validation, for objects that meet no API server (manifest-folder pods and
//! the objects beside them). Every name that becomes part of a path (namespace, pod name,
//! container and volume names, ConfigMap and Secret keys, projected item paths, subPaths) is
//! checked here, with upstream's rules and messages, before anything touches the filesystem;
//! numbers that meet clocks are bounded as upstream bounds them; and exec commands the kernel
//! could not run (an argument past `MAX_ARG_STRLEN`) are refused instead of being handed to runc.
//!
//! Written by hand: the rules are a handful of regular languages and length limits, and no
//! crate carries Kubernetes' validation.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Container, KeyToPath, Pod, Probe, Volume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::pod::api::RestartPolicy;

/// The kernel's limit on one argument or environment string, terminating NUL included
/// (`MAX_ARG_STRLEN`, 32 pages).
pub const MAX_ARG_BYTES: usize = 32 * 4096;
/// What one exec command may total: a quarter of the default 8 MiB stack is the kernel's
/// `ARG_MAX`, shared with the environment; half of that is left to the command.
pub const MAX_COMMAND_BYTES: usize = 1024 * 1024;

const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const CONFIG_KEY_MSG: &str = "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')";

/// A value shown in a message: quoted, and cut so a huge input makes no huge message.
fn shown(value: &str) -> String {
    const MAX: usize = 80;
    if value.chars().count() <= MAX {
        format!("{value:?}")
    } else {
        let cut: String = value.chars().take(MAX).collect();
        format!("{cut:?}… ({} bytes)", value.len())
    }
}

fn invalid(field: &str, value: &str, detail: &str) -> String {
    format!("{field}: Invalid value: {}: {detail}", shown(value))
}

fn label_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An RFC 1123 label (namespaces, container, volume and port names).
pub fn dns_label(field: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{field}: Required value"));
    }
    if s.len() > 63 {
        return Err(invalid(field, s, "must be no more than 63 characters"));
    }
    if !label_ok(s) {
        return Err(invalid(field, s, DNS1123_LABEL_MSG));
    }
    Ok(())
}

/// An RFC 1123 subdomain (object names).
pub fn dns_subdomain(field: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{field}: Required value"));
    }
    if s.len() > 253 {
        return Err(invalid(field, s, "must be no more than 253 characters"));
    }
    if !s.split('.').all(label_ok) {
        return Err(invalid(field, s, DNS1123_SUBDOMAIN_MSG));
    }
    Ok(())
}

/// A ConfigMap or Secret key (a file name in a volume).
pub fn config_key(field: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{field}: Required value"));
    }
    if s.len() > 253 {
        return Err(invalid(field, s, "must be no more than 253 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(invalid(field, s, CONFIG_KEY_MSG));
    }
    if s == "." || s == ".." || s.starts_with("..") {
        return Err(invalid(
            field,
            s,
            "must not be '.' or '..' or start with '..'",
        ));
    }
    Ok(())
}

/// A relative path that stays below its base (`items[].path`, `subPath`).
pub fn descending_path(field: &str, s: &str) -> Result<(), String> {
    if s.starts_with('/') {
        return Err(invalid(field, s, "must be a relative path"));
    }
    if s.split('/').any(|part| part == "..") {
        return Err(invalid(field, s, "must not contain '..'"));
    }
    if s.contains('\0') {
        return Err(invalid(field, s, "must not contain a NUL byte"));
    }
    Ok(())
}

/// An object's name and namespace, as the API server checks them.
pub fn object_meta(meta: &ObjectMeta, namespaced: bool) -> Result<(), String> {
    dns_subdomain("metadata.name", meta.name.as_deref().unwrap_or(""))?;
    if namespaced {
        if let Some(ns) = meta.namespace.as_deref() {
            dns_label("metadata.namespace", ns)?;
        }
    }
    Ok(())
}

/// The keys of a ConfigMap's or Secret's data.
pub fn config_keys<'a>(keys: impl Iterator<Item = &'a String>) -> Result<(), String> {
    for k in keys {
        config_key(&format!("data[{k:?}]"), k)?;
    }
    Ok(())
}

fn command(field: &str, args: &[String]) -> Result<(), String> {
    let mut total = 0usize;
    for (i, a) in args.iter().enumerate() {
        if a.len() >= MAX_ARG_BYTES {
            return Err(format!(
                "{field}[{i}]: Too long: {} bytes, more than the kernel runs in one argument ({})",
                a.len(),
                MAX_ARG_BYTES - 1
            ));
        }
        if a.contains('\0') {
            return Err(format!("{field}[{i}]: Invalid value: contains a NUL byte"));
        }
        total = total.saturating_add(a.len() + 1);
    }
    if total > MAX_COMMAND_BYTES {
        return Err(format!(
            "{field}: Too long: {total} bytes, more than {MAX_COMMAND_BYTES}"
        ));
    }
    Ok(())
}

fn probe(field: &str, p: Option<&Probe>) -> Result<(), String> {
    let Some(p) = p else { return Ok(()) };
    if let Some(exec) = &p.exec {
        command(
            &format!("{field}.exec.command"),
            exec.command.as_deref().unwrap_or_default(),
        )?;
    }
    for (name, v) in [
        ("initialDelaySeconds", p.initial_delay_seconds),
        ("timeoutSeconds", p.timeout_seconds),
        ("periodSeconds", p.period_seconds),
        ("successThreshold", p.success_threshold),
        ("failureThreshold", p.failure_threshold),
    ] {
        if v.is_some_and(|v| v < 0) {
            return Err(format!(
                "{field}.{name}: Invalid value: {}: must be greater than or equal to 0",
                v.unwrap_or_default()
            ));
        }
    }
    if let Some(g) = p.termination_grace_period_seconds {
        if g <= 0 {
            return Err(format!(
                "{field}.terminationGracePeriodSeconds: Invalid value: {g}: must be greater than 0"
            ));
        }
    }
    Ok(())
}

/// A pod's or a container's restartPolicy: one the API knows, listed as upstream lists them
/// (in declaration order for the pod's, sorted for a container's).
fn restart_policy(field: &str, policy: Option<&str>, sorted: bool) -> Result<(), String> {
    let Some(policy) = policy.filter(|p| RestartPolicy::parse(p).is_none()) else {
        return Ok(());
    };
    let mut values: Vec<&str> = RestartPolicy::ALL.iter().map(|p| p.as_str()).collect();
    if sorted {
        values.sort_unstable();
    }
    let values: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
    Err(format!(
        "{field}: Unsupported value: {}: supported values: {}",
        shown(policy),
        values.join(", ")
    ))
}

fn container(field: &str, c: &Container, volumes: &BTreeSet<&str>) -> Result<(), String> {
    dns_label(&format!("{field}.name"), &c.name)?;
    restart_policy(
        &format!("{field}.restartPolicy"),
        c.restart_policy.as_deref(),
        true,
    )?;
    if c.image.as_deref().unwrap_or("").trim().is_empty() {
        return Err(format!("{field}.image: Required value"));
    }
    command(
        &format!("{field}.command"),
        c.command.as_deref().unwrap_or_default(),
    )?;
    command(
        &format!("{field}.args"),
        c.args.as_deref().unwrap_or_default(),
    )?;
    probe(&format!("{field}.livenessProbe"), c.liveness_probe.as_ref())?;
    probe(
        &format!("{field}.readinessProbe"),
        c.readiness_probe.as_ref(),
    )?;
    probe(&format!("{field}.startupProbe"), c.startup_probe.as_ref())?;
    if let Some(lc) = &c.lifecycle {
        for (name, h) in [("postStart", &lc.post_start), ("preStop", &lc.pre_stop)] {
            if let Some(exec) = h.as_ref().and_then(|h| h.exec.as_ref()) {
                command(
                    &format!("{field}.lifecycle.{name}.exec.command"),
                    exec.command.as_deref().unwrap_or_default(),
                )?;
            }
        }
    }
    for (i, m) in c.volume_mounts.iter().flatten().enumerate() {
        let mf = format!("{field}.volumeMounts[{i}]");
        if !volumes.contains(m.name.as_str()) {
            return Err(format!(
                "{mf}.name: Not found: {}: names no volume",
                shown(&m.name)
            ));
        }
        if m.mount_path.is_empty() {
            return Err(format!("{mf}.mountPath: Required value"));
        }
        if let Some(sub) = m.sub_path.as_deref() {
            descending_path(&format!("{mf}.subPath"), sub)?;
        }
        if let Some(sub) = m.sub_path_expr.as_deref() {
            descending_path(&format!("{mf}.subPathExpr"), sub)?;
        }
    }
    Ok(())
}

fn items(field: &str, items: Option<&Vec<KeyToPath>>) -> Result<(), String> {
    for (i, item) in items.into_iter().flatten().enumerate() {
        config_key(&format!("{field}.items[{i}].key"), &item.key)?;
        if item.path.is_empty() {
            return Err(format!("{field}.items[{i}].path: Required value"));
        }
        descending_path(&format!("{field}.items[{i}].path"), &item.path)?;
    }
    Ok(())
}

fn volume(field: &str, v: &Volume) -> Result<(), String> {
    dns_label(&format!("{field}.name"), &v.name)?;
    if let Some(cm) = &v.config_map {
        items(&format!("{field}.configMap"), cm.items.as_ref())?;
    }
    if let Some(s) = &v.secret {
        items(&format!("{field}.secret"), s.items.as_ref())?;
    }
    if let Some(d) = &v.downward_api {
        for (i, item) in d.items.iter().flatten().enumerate() {
            descending_path(&format!("{field}.downwardAPI.items[{i}].path"), &item.path)?;
        }
    }
    if let Some(p) = &v.projected {
        for (j, source) in p.sources.iter().flatten().enumerate() {
            let sf = format!("{field}.projected.sources[{j}]");
            if let Some(cm) = &source.config_map {
                items(&format!("{sf}.configMap"), cm.items.as_ref())?;
            }
            if let Some(s) = &source.secret {
                items(&format!("{sf}.secret"), s.items.as_ref())?;
            }
            if let Some(d) = &source.downward_api {
                for (i, item) in d.items.iter().flatten().enumerate() {
                    descending_path(&format!("{sf}.downwardAPI.items[{i}].path"), &item.path)?;
                }
            }
            if let Some(t) = &source.service_account_token {
                descending_path(&format!("{sf}.serviceAccountToken.path"), &t.path)?;
            }
        }
    }
    Ok(())
}

/// The checks the API server's validation would make before a pod could reach a node.
pub fn pod(pod: &Pod) -> Result<(), String> {
    object_meta(&pod.metadata, true)?;
    let spec = pod.spec.as_ref().ok_or("spec: Required value")?;
    if spec.containers.is_empty() {
        return Err("spec.containers: Required value".into());
    }
    let mut volumes = BTreeSet::new();
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        volume(&format!("spec.volumes[{i}]"), v)?;
        if !volumes.insert(v.name.as_str()) {
            return Err(format!(
                "spec.volumes[{i}].name: Duplicate value: {}",
                shown(&v.name)
            ));
        }
    }
    let mut names = BTreeSet::new();
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| (format!("spec.initContainers[{i}]"), c))
        .chain(
            spec.containers
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("spec.containers[{i}]"), c)),
        );
    for (field, c) in all {
        container(&field, c, &volumes)?;
        if !names.insert(c.name.as_str()) {
            return Err(format!("{field}.name: Duplicate value: {}", shown(&c.name)));
        }
    }
    restart_policy("spec.restartPolicy", spec.restart_policy.as_deref(), false)?;
    if let Some(h) = spec.hostname.as_deref() {
        dns_label("spec.hostname", h)?;
    }
    if let Some(s) = spec.subdomain.as_deref() {
        dns_label("spec.subdomain", s)?;
    }
    if let Some(d) = spec.active_deadline_seconds {
        if !(1..=i64::from(i32::MAX)).contains(&d) {
            return Err(format!(
                "spec.activeDeadlineSeconds: Invalid value: {d}: must be between 1 and 2147483647, inclusive"
            ));
        }
    }
    if let Some(g) = spec.termination_grace_period_seconds {
        if g < 0 {
            return Err(format!(
                "spec.terminationGracePeriodSeconds: Invalid value: {g}: must be greater than or equal to 0"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_from(yaml: &str) -> Pod {
        let v = crate::source::yaml::documents(yaml, crate::source::yaml::LIMITS)
            .unwrap()
            .remove(0);
        crate::source::yaml::typed(v).unwrap()
    }

    fn check(spec_and_meta: &str) -> Result<(), String> {
        pod(&pod_from(spec_and_meta))
    }

    const OK: &str = "metadata: {name: web, namespace: team}\nspec:\n  containers:\n  - name: app\n    image: busybox\n";

    #[test]
    fn names_are_checked_as_the_api_server_checks_them() {
        assert_eq!(check(OK), Ok(()));
        let cases = [
            (OK.replace("name: web", "name: ../../x"), "metadata.name: Invalid value: \"../../x\": a lowercase RFC 1123 subdomain"),
            (OK.replace("name: web", "name: a/b"), "metadata.name"),
            (OK.replace("name: web", "name: Web"), "metadata.name"),
            (OK.replace("name: web", &format!("name: {}", "a".repeat(254))), "no more than 253"),
            (OK.replace("namespace: team", "namespace: ../etc"), "metadata.namespace: Invalid value: \"../etc\": a lowercase RFC 1123 label"),
            (OK.replace("namespace: team", "namespace: a.b"), "metadata.namespace"),
            (OK.replace("namespace: team", &format!("namespace: {}", "a".repeat(64))), "no more than 63"),
            (OK.replace("- name: app", "- name: ../app"), "spec.containers[0].name"),
            (OK.replace("- name: app", "- name: \"app\\0\""), "spec.containers[0].name"),
            (format!("{OK}  volumes:\n  - name: ../v\n    emptyDir: {{}}\n"), "spec.volumes[0].name"),
            (format!("{OK}  volumes:\n  - name: v\n    configMap: {{name: c, items: [{{key: k, path: ../../x}}]}}\n"), "spec.volumes[0].configMap.items[0].path: Invalid value: \"../../x\": must not contain '..'"),
            (format!("{OK}  volumes:\n  - name: v\n    secret: {{secretName: c, items: [{{key: k, path: /etc/x}}]}}\n"), "must be a relative path"),
            (format!("{OK}  volumes:\n  - name: v\n    configMap: {{name: c, items: [{{key: ../k, path: x}}]}}\n"), "items[0].key"),
            (format!("{OK}    volumeMounts: [{{name: v, mountPath: /v, subPath: ../../../etc}}]\n  volumes:\n  - name: v\n    emptyDir: {{}}\n"), "subPath"),
            (format!("{OK}    volumeMounts: [{{name: w, mountPath: /v}}]\n"), "names no volume"),
            (format!("{OK}  hostname: ../h\n"), "spec.hostname"),
            (format!("{OK}  activeDeadlineSeconds: 9223372036854775807\n"), "must be between 1 and 2147483647"),
            (format!("{OK}  terminationGracePeriodSeconds: -1\n"), "greater than or equal to 0"),
            (format!("{OK}  restartPolicy: Sometimes\n"), "spec.restartPolicy: Unsupported value: \"Sometimes\": supported values: \"Always\", \"OnFailure\", \"Never\""),
            (format!("{OK}    restartPolicy: Sometimes\n"), "spec.containers[0].restartPolicy: Unsupported value: \"Sometimes\": supported values: \"Always\", \"Never\", \"OnFailure\""),
            (format!("{OK}  initContainers:\n  - {{name: side, image: busybox, restartPolicy: always}}\n"), "spec.initContainers[0].restartPolicy: Unsupported value: \"always\""),
        ];
        for (yaml, expected) in cases {
            let err = check(&yaml).unwrap_err();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
    }

    #[test]
    fn config_keys_are_file_names_below_the_volume() {
        for good in ["k", "a.b", "A_B-c", ".hidden"] {
            assert_eq!(config_key("k", good), Ok(()), "{good}");
        }
        for bad in ["", ".", "..", "..x", "a/b", "/etc", "a b"] {
            assert!(config_key("k", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn exec_commands_the_kernel_cannot_run_are_refused() {
        let huge = "x".repeat(300 * 1024);
        let probe =
            format!("{OK}    livenessProbe:\n      exec:\n        command: [sh, -c, {huge}]\n");
        let err = check(&probe).unwrap_err();
        assert!(
            err.starts_with(
                "spec.containers[0].livenessProbe.exec.command[2]: Too long: 307200 bytes"
            ),
            "{err}"
        );
        let hook = format!(
            "{OK}    lifecycle:\n      preStop:\n        exec:\n          command: [sh, -c, {huge}]\n"
        );
        assert!(check(&hook)
            .unwrap_err()
            .contains("lifecycle.preStop.exec.command[2]"));
        let many = format!(
            "{OK}    args: [{}]\n",
            vec!["x".repeat(100 * 1024); 12].join(", ")
        );
        assert!(check(&many)
            .unwrap_err()
            .contains("spec.containers[0].args: Too long"));
        let fits = format!("{OK}    args: [{}]\n", "x".repeat(100 * 1024));
        assert_eq!(check(&fits), Ok(()));
    }
}
