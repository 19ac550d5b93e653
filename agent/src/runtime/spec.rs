//! The OCI runtime spec of a container, built the way containerd's CRI plugin builds it:
//! default mounts, CRI's default capabilities, masked and read-only paths (unless privileged),
//! namespaces (pid and mount new; net, ipc and uts joined by path), cgroupfs path, resources,
//! user, devices. A pure function: everything it needs from the host is passed in.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDevice,
    LinuxDeviceBuilder, LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxResourcesBuilder, Mount as OciMount, MountBuilder, PosixRlimitBuilder, PosixRlimitType,
    ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use super::{ContainerConfig, PidNamespace};

/// The capabilities containerd's CRI plugin grants by default.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability the kernel knows (privileged containers get them all).
pub const ALL_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Paths CRI masks in unprivileged containers.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths CRI makes read-only in unprivileged containers.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// RLIMIT_NOFILE soft and hard limit of container processes, when the host allows it.
pub const NOFILE_LIMIT: u64 = 1_048_576;

/// The NOFILE limit to give containers: NOFILE_LIMIT, capped by the hard limit in
/// `/proc/self/limits` text (raising a hard limit is refused on hosts without
/// CAP_SYS_RESOURCE).
pub fn nofile_limit(proc_limits: &str) -> u64 {
    proc_limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|hard| hard.parse::<u64>().ok())
        .map_or(NOFILE_LIMIT, |hard| hard.min(NOFILE_LIMIT))
}

/// The process identity after resolving the image user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// A device node, as found on the host, to create in the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceNode {
    /// Path inside the container.
    pub path: String,
    /// 'b' or 'c'.
    pub kind: char,
    pub major: i64,
    pub minor: i64,
    /// Permission bits of the host node.
    pub file_mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Host facts the spec depends on.
#[derive(Clone, Debug, Default)]
pub struct SpecInputs {
    pub user: ResolvedUser,
    /// `config.devices`, looked up on the host (same order).
    pub devices: Vec<DeviceNode>,
    /// Every device of the host, for privileged containers.
    pub host_devices: Vec<DeviceNode>,
    /// The host runs cgroup v2 (unified).
    pub cgroup_v2: bool,
    /// RLIMIT_NOFILE (soft = hard) of the process; 0 leaves the runtime's own.
    pub nofile: u64,
    /// The agent's capability bounding set (kernel bit order), which caps what privileged
    /// containers get; None = every capability.
    pub bounding: Option<u64>,
}

/// Why a spec could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A capability name is not known.
    #[error("unknown capability {0:?}")]
    Capability(String),
    /// A mount destination is not an absolute path.
    #[error("mount destination {0:?} is not absolute")]
    Destination(String),
    /// oci-spec refused a value.
    #[error("building the spec: {0}")]
    Build(#[from] oci_spec::OciSpecError),
}

/// The bounding set in `/proc/self/status` text (`CapBnd:` as hex).
pub fn bounding_set(proc_status: &str) -> Option<u64> {
    proc_status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// Normalises a Kubernetes capability name ("NET_ADMIN") to the kernel's ("CAP_NET_ADMIN").
fn cap_name(name: &str) -> String {
    let upper = name.trim().to_ascii_uppercase();
    if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    }
}

/// The capability set: defaults, then drops, then adds (CRI's order); "ALL" in either list
/// means every capability. Privileged containers get every capability the agent itself has
/// (`current`, a bounding-set mask in kernel bit order; None = all), as CRI grants "all
/// current capabilities".
pub fn capabilities(
    privileged: bool,
    add: &[String],
    drop: &[String],
    current: Option<u64>,
) -> Result<HashSet<Capability>, SpecError> {
    let parse = |n: &str| {
        Capability::from_str(n.trim_start_matches("CAP_"))
            .map_err(|_| SpecError::Capability(n.to_string()))
    };
    let all = || {
        ALL_CAPABILITIES
            .iter()
            .map(|c| parse(c))
            .collect::<Result<HashSet<_>, _>>()
    };
    if privileged {
        return ALL_CAPABILITIES
            .iter()
            .enumerate()
            .filter(|(bit, _)| current.is_none_or(|mask| mask & (1u64 << bit) != 0))
            .map(|(_, c)| parse(c))
            .collect();
    }
    let mut caps: HashSet<Capability> = DEFAULT_CAPABILITIES
        .iter()
        .map(|c| parse(c))
        .collect::<Result<_, _>>()?;
    for d in drop {
        let n = cap_name(d);
        if n == "CAP_ALL" {
            caps.clear();
        } else {
            caps.remove(&parse(&n)?);
        }
    }
    for a in add {
        let n = cap_name(a);
        if n == "CAP_ALL" {
            caps.extend(all()?);
        } else {
            caps.insert(parse(&n)?);
        }
    }
    Ok(caps)
}

fn mount(dest: &str, kind: &str, source: &str, options: &[&str]) -> Result<OciMount, SpecError> {
    Ok(MountBuilder::default()
        .destination(dest)
        .typ(kind)
        .source(source)
        .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        .build()?)
}

/// Containerd's default mounts without /run (CRI removes it), plus the cgroup mount.
fn default_mounts(privileged: bool) -> Result<Vec<OciMount>, SpecError> {
    let ro_or_rw = if privileged { "rw" } else { "ro" };
    Ok(vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", ro_or_rw],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", ro_or_rw],
        )?,
    ])
}

/// Cleans a container path lexically ("/a/./b/" → "/a/b").
fn clean(p: &str) -> String {
    let mut out = PathBuf::from("/");
    for c in Path::new(p).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out.to_string_lossy().into_owned()
}

fn depth(p: &str) -> usize {
    p.split('/').filter(|s| !s.is_empty()).count()
}

/// Default mounts not shadowed by a user mount, then user mounts sorted by depth (parents
/// before children, stable otherwise).
fn mounts(config: &ContainerConfig) -> Result<Vec<OciMount>, SpecError> {
    let mut user: Vec<(String, &super::Mount)> = Vec::new();
    for m in &config.mounts {
        if !m.destination.starts_with('/') {
            return Err(SpecError::Destination(m.destination.clone()));
        }
        user.push((clean(&m.destination), m));
    }
    user.sort_by_key(|(d, _)| depth(d));
    let taken: HashSet<&str> = user.iter().map(|(d, _)| d.as_str()).collect();
    let mut out: Vec<OciMount> = default_mounts(config.security.privileged)?
        .into_iter()
        .filter(|m| !taken.contains(m.destination().to_string_lossy().as_ref()))
        .collect();
    for (dest, m) in user {
        let mut options = m.options.clone();
        let kind = if m.kind.is_empty() {
            "bind"
        } else {
            m.kind.as_str()
        };
        if kind == "bind" && !options.iter().any(|o| o == "bind" || o == "rbind") {
            options.insert(0, "rbind".into());
        }
        if kind == "bind"
            && !options
                .iter()
                .any(|o| o.ends_with("private") || o.ends_with("shared") || o.ends_with("slave"))
        {
            options.push("rprivate".into());
        }
        out.push(
            MountBuilder::default()
                .destination(dest)
                .typ(kind)
                .source(m.source.clone())
                .options(options)
                .build()?,
        );
    }
    Ok(out)
}

fn namespace(typ: LinuxNamespaceType, path: Option<&Path>) -> Result<LinuxNamespace, SpecError> {
    let mut b = LinuxNamespaceBuilder::default().typ(typ);
    if let Some(p) = path {
        b = b.path(p);
    }
    Ok(b.build()?)
}

fn device(node: &DeviceNode) -> Result<LinuxDevice, SpecError> {
    let typ = if node.kind == 'b' {
        LinuxDeviceType::B
    } else {
        LinuxDeviceType::C
    };
    Ok(LinuxDeviceBuilder::default()
        .path(node.path.clone())
        .typ(typ)
        .major(node.major)
        .minor(node.minor)
        .file_mode(node.file_mode & 0o7777)
        .uid(node.uid)
        .gid(node.gid)
        .build()?)
}

fn device_rule(allow: bool, node: Option<&DeviceNode>) -> Result<LinuxDeviceCgroup, SpecError> {
    let mut b = LinuxDeviceCgroupBuilder::default()
        .allow(allow)
        .access("rwm");
    if let Some(n) = node {
        b = b
            .typ(if n.kind == 'b' {
                LinuxDeviceType::B
            } else {
                LinuxDeviceType::C
            })
            .major(n.major)
            .minor(n.minor);
    }
    Ok(b.build()?)
}

/// The PATH containerd's default spec gives every process, kept when neither the image nor
/// the container sets one.
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The process env as containerd's CRI builds it: the default spec's PATH, then the image's
/// and container's `KEY=VALUE`s, a name already present having its value replaced in place.
fn process_env(vars: &[String]) -> Vec<String> {
    let key = |kv: &str| kv.split_once('=').map_or(kv, |(k, _)| k).to_string();
    let mut env = vec![DEFAULT_PATH_ENV.to_string()];
    for kv in vars {
        match env.iter_mut().find(|e| key(e) == key(kv)) {
            Some(slot) => slot.clone_from(kv),
            None => env.push(kv.clone()),
        }
    }
    env
}

/// Builds the container's OCI runtime spec.
pub fn build_spec(config: &ContainerConfig, inputs: &SpecInputs) -> Result<Spec, SpecError> {
    let sec = &config.security;
    let caps = capabilities(
        sec.privileged,
        &sec.add_capabilities,
        &sec.drop_capabilities,
        inputs.bounding,
    )?;
    // Ambient capabilities only matter for non-root users; CRI leaves them empty.
    let mut capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .build()?;
    // The builder fills unset sets with oci-spec's defaults: clear them.
    capabilities.set_inheritable(None);
    capabilities.set_ambient(None);
    let mut user = UserBuilder::default()
        .uid(inputs.user.uid)
        .gid(inputs.user.gid);
    if !inputs.user.additional_gids.is_empty() {
        user = user.additional_gids(inputs.user.additional_gids.clone());
    }
    let cwd = if config.cwd.is_empty() {
        "/".to_string()
    } else {
        config.cwd.clone()
    };
    let process = ProcessBuilder::default()
        .terminal(config.tty)
        .user(user.build()?)
        .args(config.args.clone())
        .env(process_env(&config.env))
        .cwd(cwd)
        .capabilities(capabilities)
        .rlimits(if inputs.nofile == 0 {
            Vec::new()
        } else {
            vec![PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitNofile)
                .hard(inputs.nofile)
                .soft(inputs.nofile)
                .build()?]
        })
        .no_new_privileges(sec.no_new_privileges && !sec.privileged)
        .oom_score_adj(config.resources.oom_score_adj.max(0))
        .build()?;

    let ns = &config.namespaces;
    let pid = match &ns.pid {
        PidNamespace::Own => Some(None),
        PidNamespace::Host => None,
        PidNamespace::Join(path) => Some(Some(path.as_path())),
    };
    let mut namespaces = Vec::new();
    if let Some(path) = pid {
        namespaces.push(namespace(LinuxNamespaceType::Pid, path)?);
    }
    namespaces.extend([
        namespace(LinuxNamespaceType::Ipc, ns.ipc.as_deref())?,
        namespace(LinuxNamespaceType::Uts, ns.uts.as_deref())?,
        namespace(LinuxNamespaceType::Mount, None)?,
    ]);
    // No net entry for None: the container shares the host's network.
    if let Some(net) = &ns.net {
        namespaces.push(namespace(LinuxNamespaceType::Network, Some(net))?);
    }
    if inputs.cgroup_v2 && !sec.privileged {
        namespaces.push(namespace(LinuxNamespaceType::Cgroup, None)?);
    }

    let mut device_rules = vec![device_rule(false, None)?];
    let mut devices = Vec::new();
    if sec.privileged {
        device_rules = vec![device_rule(true, None)?];
        for d in &inputs.host_devices {
            devices.push(device(d)?);
        }
    }
    for d in &inputs.devices {
        devices.retain(|existing: &LinuxDevice| existing.path() != Path::new(&d.path));
        devices.push(device(d)?);
        if !sec.privileged {
            device_rules.push(device_rule(true, Some(d))?);
        }
    }

    let r = &config.resources;
    let mut cpu = LinuxCpuBuilder::default();
    if let Some(s) = r.cpu_shares {
        cpu = cpu.shares(s);
    }
    if let Some(q) = r.cpu_quota {
        cpu = cpu.quota(q);
    }
    if let Some(p) = r.cpu_period {
        cpu = cpu.period(p);
    }
    let mut resources = LinuxResourcesBuilder::default()
        .devices(device_rules)
        .cpu(cpu.build()?);
    if let Some(limit) = r.memory_limit {
        resources = resources.memory(LinuxMemoryBuilder::default().limit(limit).build()?);
    }

    let cgroup_parent = if config.cgroup_parent.is_empty() {
        "/nodelet".to_string()
    } else {
        clean(&config.cgroup_parent)
    };
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(PathBuf::from(format!(
            "{}/{}",
            cgroup_parent.trim_end_matches('/'),
            config.id
        )))
        .resources(resources.build()?)
        .devices(devices);
    if !config.sysctls.is_empty() {
        linux = linux.sysctl(config.sysctls.clone());
    }
    let mut linux = linux.build()?;
    if sec.privileged {
        linux.set_masked_paths(None);
        linux.set_readonly_paths(None);
    } else {
        linux.set_masked_paths(Some(MASKED_PATHS.iter().map(|s| s.to_string()).collect()));
        linux.set_readonly_paths(Some(READONLY_PATHS.iter().map(|s| s.to_string()).collect()));
    }

    let mut spec = SpecBuilder::default()
        .version("1.0.2-dev")
        .root(
            RootBuilder::default()
                .path("rootfs")
                .readonly(sec.read_only_rootfs)
                .build()?,
        )
        .process(process)
        .mounts(mounts(config)?)
        .linux(linux)
        .build()?;
    // Unset means unset, not oci-spec's default hostname.
    spec.set_hostname((!config.hostname.is_empty()).then(|| config.hostname.clone()));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{Mount, NamespacePaths, Resources, Security};

    fn base() -> ContainerConfig {
        ContainerConfig {
            id: "c1".into(),
            args: vec!["sh".into()],
            env: vec!["A=1".into()],
            cgroup_parent: "/nodelet/podu1".into(),
            ..Default::default()
        }
    }

    fn json(spec: &Spec) -> serde_json::Value {
        serde_json::to_value(spec).unwrap()
    }

    /// The spec's mount destinations, in order.
    fn destinations(v: &serde_json::Value) -> Vec<&str> {
        v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn defaults_match_cri() {
        let inputs = SpecInputs {
            nofile: NOFILE_LIMIT,
            ..Default::default()
        };
        let spec = build_spec(&base(), &inputs).unwrap();
        let v = json(&spec);
        assert_eq!(v["root"]["path"], "rootfs");
        assert!(v.get("hostname").is_none());
        assert_eq!(v["root"]["readonly"], false);
        assert_eq!(v["process"]["noNewPrivileges"], false);
        assert_eq!(v["process"]["args"], serde_json::json!(["sh"]));
        assert_eq!(v["process"]["cwd"], "/");
        assert_eq!(v["linux"]["cgroupsPath"], "/nodelet/podu1/c1");
        let dests = destinations(&v);
        assert_eq!(
            dests,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/sys/fs/cgroup"
            ]
        );
        let caps = v["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert_eq!(caps.len(), DEFAULT_CAPABILITIES.len());
        assert!(caps.iter().any(|c| c == "CAP_NET_BIND_SERVICE"));
        assert!(v["process"]["capabilities"].get("inheritable").is_none());
        assert_eq!(
            v["linux"]["maskedPaths"].as_array().unwrap().len(),
            MASKED_PATHS.len()
        );
        assert_eq!(v["process"]["rlimits"][0]["type"], "RLIMIT_NOFILE");
        assert_eq!(v["process"]["rlimits"][0]["hard"], NOFILE_LIMIT);
        assert_eq!(v["linux"]["resources"]["devices"][0]["allow"], false);
        let sys = &v["mounts"][5];
        assert!(sys["options"].as_array().unwrap().iter().any(|o| o == "ro"));
    }

    #[test]
    fn env_starts_from_containerds_default_path() {
        let inputs = SpecInputs::default();
        let env = |vars: &[&str]| {
            let config = ContainerConfig {
                env: vars.iter().map(|v| v.to_string()).collect(),
                ..base()
            };
            json(&build_spec(&config, &inputs).unwrap())["process"]["env"].clone()
        };
        // An image that sets no PATH gets containerd's default, first.
        assert_eq!(
            env(&["A=1"]),
            serde_json::json!([
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "A=1"
            ])
        );
        // A PATH from the image or the container replaces it in place.
        assert_eq!(
            env(&["A=1", "PATH=/bin", "B=2"]),
            serde_json::json!(["PATH=/bin", "A=1", "B=2"])
        );
    }

    #[test]
    fn namespaces_net_none_means_host_network() {
        let spec = build_spec(&base(), &SpecInputs::default()).unwrap();
        let v = json(&spec);
        let types: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["pid", "ipc", "uts", "mount"]);

        let mut c = base();
        c.namespaces = NamespacePaths {
            net: Some("/run/nodelet/netns/p".into()),
            ipc: Some("/run/nodelet/ipcns/p".into()),
            uts: None,
            pid: PidNamespace::Own,
        };
        let v = json(
            &build_spec(
                &c,
                &SpecInputs {
                    cgroup_v2: true,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        let net = ns.iter().find(|n| n["type"] == "network").unwrap();
        assert_eq!(net["path"], "/run/nodelet/netns/p");
        let ipc = ns.iter().find(|n| n["type"] == "ipc").unwrap();
        assert_eq!(ipc["path"], "/run/nodelet/ipcns/p");
        let uts = ns.iter().find(|n| n["type"] == "uts").unwrap();
        assert!(uts.get("path").is_none());
        assert!(ns.iter().any(|n| n["type"] == "cgroup"));
        let pid = ns.iter().find(|n| n["type"] == "pid").unwrap();
        assert!(pid.get("path").is_none(), "a PID namespace of its own");
    }

    #[test]
    fn an_ephemeral_container_joins_its_targets_pid_namespace() {
        let mut c = base();
        c.namespaces.pid = PidNamespace::Join("/proc/42/ns/pid".into());
        let v = json(&build_spec(&c, &SpecInputs::default()).unwrap());
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        let pid = ns.iter().find(|n| n["type"] == "pid").unwrap();
        assert_eq!(pid["path"], "/proc/42/ns/pid");
    }

    #[test]
    fn host_pid_lists_no_pid_namespace() {
        let mut c = base();
        c.namespaces.pid = PidNamespace::Host;
        let v = json(&build_spec(&c, &SpecInputs::default()).unwrap());
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        assert!(ns.iter().all(|n| n["type"] != "pid"), "{ns:?}");
    }

    #[test]
    fn resources_user_and_security() {
        let mut c = base();
        c.resources = Resources {
            cpu_shares: Some(512),
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            memory_limit: Some(64 << 20),
            oom_score_adj: -998,
        };
        c.security = Security {
            read_only_rootfs: true,
            no_new_privileges: true,
            add_capabilities: vec!["NET_ADMIN".into()],
            drop_capabilities: vec!["chown".into(), "CAP_KILL".into()],
            ..Default::default()
        };
        c.hostname = "web-0".into();
        c.sysctls.insert("net.ipv4.ip_forward".into(), "1".into());
        let inputs = SpecInputs {
            user: ResolvedUser {
                uid: 1000,
                gid: 100,
                additional_gids: vec![5, 6],
            },
            ..Default::default()
        };
        let v = json(&build_spec(&c, &inputs).unwrap());
        assert_eq!(v["linux"]["resources"]["cpu"]["shares"], 512);
        assert_eq!(v["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(v["linux"]["resources"]["cpu"]["period"], 100_000);
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(v["process"]["oomScoreAdj"], 0);
        assert_eq!(v["process"]["user"]["uid"], 1000);
        assert_eq!(v["process"]["user"]["gid"], 100);
        assert_eq!(
            v["process"]["user"]["additionalGids"],
            serde_json::json!([5, 6])
        );
        assert_eq!(v["root"]["readonly"], true);
        assert_eq!(v["process"]["noNewPrivileges"], true);
        assert_eq!(v["hostname"], "web-0");
        assert_eq!(v["linux"]["sysctl"]["net.ipv4.ip_forward"], "1");
        let caps = v["process"]["capabilities"]["effective"]
            .as_array()
            .unwrap();
        assert!(caps.iter().any(|c| c == "CAP_NET_ADMIN"));
        assert!(!caps.iter().any(|c| c == "CAP_CHOWN" || c == "CAP_KILL"));
    }

    #[test]
    fn privileged_gets_everything() {
        let mut c = base();
        c.security.privileged = true;
        let host = DeviceNode {
            path: "/dev/loop0".into(),
            kind: 'b',
            major: 7,
            minor: 0,
            file_mode: 0o60660,
            uid: 0,
            gid: 6,
        };
        let inputs = SpecInputs {
            host_devices: vec![host],
            ..Default::default()
        };
        let v = json(&build_spec(&c, &inputs).unwrap());
        assert_eq!(
            v["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            ALL_CAPABILITIES.len()
        );
        assert!(v["linux"].get("maskedPaths").is_none());
        assert!(v["linux"].get("readonlyPaths").is_none());
        assert_eq!(v["linux"]["resources"]["devices"][0]["allow"], true);
        assert_eq!(v["linux"]["devices"][0]["path"], "/dev/loop0");
        assert_eq!(v["linux"]["devices"][0]["fileMode"], 0o660);
        let sys = &v["mounts"][5];
        assert!(sys["options"].as_array().unwrap().iter().any(|o| o == "rw"));
    }

    #[test]
    fn user_mounts_override_defaults_and_sort_by_depth() {
        let mut c = base();
        c.mounts = vec![
            Mount {
                destination: "/data/sub".into(),
                source: "/host/sub".into(),
                kind: "bind".into(),
                options: vec!["ro".into()],
            },
            Mount {
                destination: "/dev/shm/".into(),
                source: "/run/nodelet/shm/p".into(),
                kind: "bind".into(),
                options: vec!["rbind".into()],
            },
            Mount {
                destination: "/data".into(),
                source: "/host/data".into(),
                kind: "bind".into(),
                options: vec![],
            },
        ];
        c.devices = vec![crate::runtime::Device {
            host_path: "/dev/loop1".into(),
            container_path: "/dev/xvda".into(),
        }];
        let inputs = SpecInputs {
            devices: vec![DeviceNode {
                path: "/dev/xvda".into(),
                kind: 'b',
                major: 7,
                minor: 1,
                file_mode: 0o660,
                uid: 0,
                gid: 0,
            }],
            ..Default::default()
        };
        let v = json(&build_spec(&c, &inputs).unwrap());
        let mounts = v["mounts"].as_array().unwrap();
        let dests = destinations(&v);
        assert_eq!(
            dests,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/mqueue",
                "/sys",
                "/sys/fs/cgroup",
                "/data",
                "/data/sub",
                "/dev/shm"
            ]
        );
        let sub = mounts
            .iter()
            .find(|m| m["destination"] == "/data/sub")
            .unwrap();
        assert_eq!(
            sub["options"],
            serde_json::json!(["rbind", "ro", "rprivate"])
        );
        let rules = v["linux"]["resources"]["devices"].as_array().unwrap();
        assert_eq!(rules[1]["allow"], true);
        assert_eq!(rules[1]["type"], "b");
        assert_eq!(rules[1]["major"], 7);
        assert_eq!(rules[1]["minor"], 1);
        assert_eq!(v["linux"]["devices"][0]["path"], "/dev/xvda");

        c.mounts[0].destination = "relative".into();
        assert!(matches!(
            build_spec(&c, &inputs),
            Err(SpecError::Destination(_))
        ));
    }

    #[test]
    fn nofile_is_capped_by_the_hard_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
            Max open files            1024                 20000                files\n";
        assert_eq!(nofile_limit(limits), 20000);
        let limits = "Max open files            1024                 4194304              files\n";
        assert_eq!(nofile_limit(limits), NOFILE_LIMIT);
        let limits = "Max open files            unlimited            unlimited            files\n";
        assert_eq!(nofile_limit(limits), NOFILE_LIMIT);
        let v = json(&build_spec(&base(), &SpecInputs::default()).unwrap());
        assert_eq!(v["process"]["rlimits"], serde_json::json!([]));
    }

    #[test]
    fn capability_names_and_all() {
        let caps = capabilities(false, &["ALL".into()], &[], None).unwrap();
        assert_eq!(caps.len(), ALL_CAPABILITIES.len());
        let caps = capabilities(false, &["NET_ADMIN".into()], &["ALL".into()], None).unwrap();
        assert_eq!(caps.len(), 1);
        assert!(capabilities(false, &["NOT_A_CAP".into()], &[], None).is_err());
        // Privileged: what the agent has, here everything but CAP_SYS_RESOURCE (bit 24).
        let status = "Name:\tnodelet\nCapBnd:\t000001fffeffffff\nCapAmb:\t0\n";
        let mask = bounding_set(status);
        assert_eq!(mask, Some(0x1fffeffffff));
        let caps = capabilities(true, &[], &[], mask).unwrap();
        assert_eq!(caps.len(), ALL_CAPABILITIES.len() - 1);
        assert!(!caps.contains(&Capability::SysResource));
        assert!(caps.contains(&Capability::SysAdmin));
        assert!(caps.contains(&Capability::CheckpointRestore));
    }
}
