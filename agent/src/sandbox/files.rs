//! Pure generators for the per-pod files bound into every container: `/etc/hosts`,
//! `/etc/resolv.conf` and `/etc/hostname`, in the formats the kubelet (hosts) and containerd's
//! CRI plugin (resolv.conf, hostname) write. No I/O here: callers pass the host's files in.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{HostAlias, Pod, PodDNSConfig};

/// Longest hostname the kernel accepts for a pod (a DNS label).
pub const MAX_HOSTNAME_LEN: usize = 63;
/// Longest FQDN accepted when `setHostnameAsFQDN` is set (the kernel's limit).
pub const MAX_FQDN_LEN: usize = 64;
/// The resolver reads at most this many nameservers.
pub const MAX_NAMESERVERS: usize = 3;
/// The resolver reads at most this many search domains.
pub const MAX_SEARCHES: usize = 32;

/// A pod's name inside its sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNames {
    /// The short hostname: spec.hostname, else the pod name truncated to 63 characters.
    pub hostname: String,
    /// `<subdomain>.<ns>.svc.<cluster_domain>` when spec.subdomain is set.
    pub domain: Option<String>,
    /// What the UTS namespace is set to: the FQDN when spec.setHostnameAsFQDN, else `hostname`.
    pub kernel_hostname: String,
}

/// Why a pod's names cannot be computed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NamesError {
    /// The pod has neither spec.hostname nor a usable metadata.name.
    #[error("pod has no usable name for its hostname")]
    NoName,
    /// spec.hostnameOverride is not a DNS-1123 subdomain (the kubelet refuses it too).
    #[error("pod HostnameOverride {0:?} is not a valid DNS subdomain")]
    BadHostnameOverride(String),
    /// setHostnameAsFQDN would give a hostname longer than the kernel allows.
    #[error("FQDN {fqdn} is longer than {MAX_FQDN_LEN} characters")]
    FqdnTooLong {
        /// The rejected FQDN.
        fqdn: String,
    },
}

/// Computes the pod's hostname and domain as the kubelet does. `spec.hostnameOverride` (beta
/// and on by default since 1.34) wins over hostname, subdomain and setHostnameAsFQDN: it is
/// the hostname, cut to a kernel hostname, with no domain.
pub fn pod_names(pod: &Pod, cluster_domain: &str) -> Result<PodNames, NamesError> {
    let spec = pod.spec.as_ref();
    if let Some(name) = spec.and_then(|s| s.hostname_override.as_deref()) {
        if !is_dns_subdomain(name) {
            return Err(NamesError::BadHostnameOverride(name.to_string()));
        }
        let hostname = truncate_hostname(name)?;
        return Ok(PodNames {
            kernel_hostname: hostname.clone(),
            hostname,
            domain: None,
        });
    }
    let hostname = match spec.and_then(|s| s.hostname.as_deref()) {
        Some(h) if !h.is_empty() => h.to_string(),
        _ => truncate_hostname(pod.metadata.name.as_deref().unwrap_or_default())?,
    };
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let domain = spec
        .and_then(|s| s.subdomain.as_deref())
        .filter(|s| !s.is_empty())
        .map(|sub| format!("{sub}.{namespace}.svc.{cluster_domain}"));
    let fqdn_wanted = spec.and_then(|s| s.set_hostname_as_fqdn).unwrap_or(false);
    let kernel_hostname = match (&domain, fqdn_wanted) {
        (Some(d), true) => {
            let fqdn = format!("{hostname}.{d}");
            if fqdn.len() > MAX_FQDN_LEN {
                return Err(NamesError::FqdnTooLong { fqdn });
            }
            fqdn
        }
        _ => hostname.clone(),
    };
    Ok(PodNames {
        hostname,
        domain,
        kernel_hostname,
    })
}

/// A DNS-1123 subdomain: at most 253 characters of dot-separated labels, each lowercase
/// alphanumerics and '-', starting and ending alphanumeric.
fn is_dns_subdomain(name: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    name.len() <= 253 && name.split('.').all(label_ok)
}

/// Cuts a pod name to a valid hostname length, dropping trailing '-' and '.'.
fn truncate_hostname(name: &str) -> Result<String, NamesError> {
    let cut = if name.len() > MAX_HOSTNAME_LEN {
        // Pod names are ASCII (DNS subdomains), so a byte cut is a character cut.
        name.get(..MAX_HOSTNAME_LEN).ok_or(NamesError::NoName)?
    } else {
        name
    };
    let trimmed = cut.trim_end_matches(['-', '.']);
    if trimmed.is_empty() {
        return Err(NamesError::NoName);
    }
    Ok(trimmed.to_string())
}

/// The header and fixed lines of a kubelet-managed hosts file.
const MANAGED_HOSTS_HEADER: &str = "# Kubernetes-managed hosts file.\n\
127.0.0.1\tlocalhost\n\
::1\tlocalhost ip6-localhost ip6-loopback\n\
fe00::0\tip6-localnet\n\
fe00::0\tip6-mcastprefix\n\
fe00::1\tip6-allnodes\n\
fe00::2\tip6-allrouters\n";

/// The hosts file of a pod with its own network namespace.
pub fn managed_hosts(ips: &[IpAddr], names: &PodNames, aliases: &[HostAlias]) -> String {
    let mut out = String::from(MANAGED_HOSTS_HEADER);
    for ip in ips {
        match &names.domain {
            Some(domain) => out.push_str(&format!(
                "{ip}\t{host}.{domain}\t{host}\n",
                host = names.hostname
            )),
            None => out.push_str(&format!("{ip}\t{}\n", names.hostname)),
        }
    }
    out.push_str(&host_alias_entries(aliases));
    out
}

/// The hosts file of a hostNetwork pod: the node's own hosts file plus the pod's aliases.
pub fn host_network_hosts(node_hosts: &str, aliases: &[HostAlias]) -> String {
    let mut out = String::from("# Kubernetes-managed hosts file (host network).\n");
    out.push_str(node_hosts);
    if !node_hosts.is_empty() && !node_hosts.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&host_alias_entries(aliases));
    out
}

/// The `spec.hostAliases` section: one line per IP with all its hostnames.
fn host_alias_entries(aliases: &[HostAlias]) -> String {
    if aliases.is_empty() {
        return String::new();
    }
    let mut out = String::from("\n# Entries added by HostAliases.\n");
    for alias in aliases {
        let names = alias.hostnames.as_deref().unwrap_or_default().join("\t");
        out.push_str(&format!("{}\t{names}\n", alias.ip));
    }
    out
}

/// A resolver configuration: what `/etc/resolv.conf` says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsConfig {
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    /// Options as written, e.g. `ndots:5`, `edns0`.
    pub options: Vec<String>,
}

/// Parses a resolv.conf: `nameserver` lines accumulate, the last `search` line wins, `options`
/// accumulate; `#` and `;` start comments.
pub fn parse_resolv_conf(content: &str) -> DnsConfig {
    let mut cfg = DnsConfig::default();
    for line in content.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("nameserver") => cfg.nameservers.extend(fields.next().map(str::to_string)),
            Some("search") => {
                cfg.searches = fields
                    .filter(|s| *s != ".")
                    .map(|s| s.trim_end_matches('.').to_string())
                    .collect();
            }
            Some("options") => cfg.options.extend(fields.map(str::to_string)),
            _ => {}
        }
    }
    cfg
}

/// Writes a resolv.conf: `search`, then `nameserver` lines, then `options`.
pub fn format_resolv_conf(cfg: &DnsConfig) -> String {
    let mut out = String::new();
    if !cfg.searches.is_empty() {
        out.push_str(&format!("search {}\n", cfg.searches.join(" ")));
    }
    for ns in &cfg.nameservers {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    if !cfg.options.is_empty() {
        out.push_str(&format!("options {}\n", cfg.options.join(" ")));
    }
    out
}

/// Which resolver a pod gets, after the dnsPolicy fallbacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DnsKind {
    Cluster,
    Host,
    None,
}

/// The resolver the pod's dnsPolicy asks for.
fn requested_dns(pod: &Pod) -> DnsKind {
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    match spec.and_then(|s| s.dns_policy.as_deref()) {
        Some("None") => DnsKind::None,
        Some("Default") => DnsKind::Host,
        Some("ClusterFirstWithHostNet") => DnsKind::Cluster,
        // "ClusterFirst", unset, or anything the API server should have rejected.
        _ if host_network => DnsKind::Host,
        _ => DnsKind::Cluster,
    }
}

/// Whether the pod asks for the cluster's resolver while no cluster DNS is configured: it gets
/// the node's instead (`pod_dns`), which the kubelet reports as a MissingClusterDNS event.
pub fn cluster_dns_missing(pod: &Pod, cluster_dns: &[String]) -> bool {
    requested_dns(pod) == DnsKind::Cluster && cluster_dns.is_empty()
}

/// The pod's resolver configuration as the kubelet computes it: dnsPolicy (ClusterFirst
/// falls back to the host's for hostNetwork pods and when no cluster DNS is configured), then
/// spec.dnsConfig merged in, then the resolver's limits applied.
pub fn pod_dns(
    pod: &Pod,
    cluster_dns: &[String],
    cluster_domain: &str,
    host: &DnsConfig,
) -> DnsConfig {
    let spec = pod.spec.as_ref();
    let kind = match requested_dns(pod) {
        DnsKind::Cluster if cluster_dns.is_empty() => DnsKind::Host,
        kind => kind,
    };
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut cfg = match kind {
        DnsKind::Cluster => DnsConfig {
            nameservers: cluster_dns.to_vec(),
            searches: cluster_searches(namespace, cluster_domain, &host.searches),
            options: vec!["ndots:5".to_string()],
        },
        DnsKind::Host => host.clone(),
        DnsKind::None => DnsConfig::default(),
    };
    if let Some(extra) = spec.and_then(|s| s.dns_config.as_ref()) {
        merge_dns_config(&mut cfg, extra);
    }
    cfg.nameservers.truncate(MAX_NAMESERVERS);
    cfg.searches.truncate(MAX_SEARCHES);
    cfg
}

/// `<ns>.svc.<domain> svc.<domain> <domain>` followed by the host's search domains.
fn cluster_searches(namespace: &str, domain: &str, host_searches: &[String]) -> Vec<String> {
    if domain.is_empty() {
        return dedup(host_searches.to_vec());
    }
    let mut all = vec![
        format!("{namespace}.svc.{domain}"),
        format!("svc.{domain}"),
        domain.to_string(),
    ];
    all.extend(host_searches.iter().cloned());
    dedup(all)
}

/// Appends the pod's nameservers and searches; pod options override same-named ones.
fn merge_dns_config(cfg: &mut DnsConfig, extra: &PodDNSConfig) {
    cfg.nameservers
        .extend(extra.nameservers.iter().flatten().cloned());
    cfg.nameservers = dedup(std::mem::take(&mut cfg.nameservers));
    cfg.searches
        .extend(extra.searches.iter().flatten().cloned());
    cfg.searches = dedup(std::mem::take(&mut cfg.searches));

    let mut options: Vec<(String, Option<String>)> = cfg
        .options
        .iter()
        .map(|o| match o.split_once(':') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (o.clone(), None),
        })
        .collect();
    for opt in extra.options.iter().flatten() {
        let Some(name) = opt.name.clone() else {
            continue;
        };
        let value = opt.value.clone().filter(|v| !v.is_empty());
        match options.iter_mut().find(|(k, _)| *k == name) {
            Some(existing) => existing.1 = value,
            None => options.push((name, value)),
        }
    }
    cfg.options = options
        .into_iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{k}:{v}"),
            None => k,
        })
        .collect();
}

/// Drops repeated entries, keeping the first of each.
fn dedup(items: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// The `/etc/hostname` file.
pub fn hostname_file(kernel_hostname: &str) -> String {
    format!("{kernel_hostname}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodDNSConfigOption, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(name: &str, ns: &str, spec: PodSpec) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(spec),
            ..Default::default()
        }
    }

    fn statefulset_pod() -> Pod {
        pod(
            "web-0",
            "prod",
            PodSpec {
                hostname: Some("web-0".into()),
                subdomain: Some("web".into()),
                ..Default::default()
            },
        )
    }

    #[test]
    fn hostname_defaults_to_pod_name() {
        let names = pod_names(&pod("a", "default", PodSpec::default()), "cluster.local").unwrap();
        assert_eq!(names.hostname, "a");
        assert_eq!(names.domain, None);
        assert_eq!(names.kernel_hostname, "a");
    }

    #[test]
    fn long_pod_name_is_truncated_without_trailing_dash() {
        let name = format!("{}-{}", "a".repeat(62), "b".repeat(10));
        let names = pod_names(&pod(&name, "default", PodSpec::default()), "c.l").unwrap();
        assert_eq!(names.hostname, "a".repeat(62));
    }

    #[test]
    fn empty_name_is_an_error() {
        let p = pod("", "default", PodSpec::default());
        assert_eq!(pod_names(&p, "c.l"), Err(NamesError::NoName));
    }

    #[test]
    fn statefulset_names_and_fqdn() {
        let mut p = statefulset_pod();
        let names = pod_names(&p, "cluster.local").unwrap();
        assert_eq!(names.hostname, "web-0");
        assert_eq!(names.domain.as_deref(), Some("web.prod.svc.cluster.local"));
        assert_eq!(names.kernel_hostname, "web-0");

        p.spec.as_mut().unwrap().set_hostname_as_fqdn = Some(true);
        let names = pod_names(&p, "cluster.local").unwrap();
        assert_eq!(names.kernel_hostname, "web-0.web.prod.svc.cluster.local");

        p.spec.as_mut().unwrap().subdomain = Some("s".repeat(60));
        assert!(matches!(
            pod_names(&p, "cluster.local"),
            Err(NamesError::FqdnTooLong { .. })
        ));
    }

    #[test]
    fn hostname_override_wins_with_no_domain() {
        let mut p = statefulset_pod();
        let spec = p.spec.as_mut().unwrap();
        spec.hostname_override = Some("www.example.com".into());
        spec.set_hostname_as_fqdn = Some(true);
        let names = pod_names(&p, "cluster.local").unwrap();
        assert_eq!(names.hostname, "www.example.com");
        assert_eq!(names.domain, None);
        assert_eq!(names.kernel_hostname, "www.example.com");
        let hosts = managed_hosts(&["10.233.0.7".parse().unwrap()], &names, &[]);
        assert!(
            hosts.ends_with("\n10.233.0.7\twww.example.com\n"),
            "{hosts}"
        );
        // Cut to a kernel hostname as the kubelet cuts it, trailing '-' and '.' dropped.
        let long = format!("{}.{}", "a".repeat(62), "b".repeat(10));
        p.spec.as_mut().unwrap().hostname_override = Some(long);
        assert_eq!(pod_names(&p, "c.l").unwrap().hostname, "a".repeat(62));
        p.spec.as_mut().unwrap().hostname_override = Some("Not_A_Name".into());
        assert!(matches!(
            pod_names(&p, "c.l"),
            Err(NamesError::BadHostnameOverride { .. })
        ));
    }

    #[test]
    fn hosts_file_for_statefulset_pod_with_aliases() {
        let names = pod_names(&statefulset_pod(), "cluster.local").unwrap();
        let aliases = vec![HostAlias {
            ip: "10.1.2.3".into(),
            hostnames: Some(vec!["foo.local".into(), "bar.local".into()]),
        }];
        let ips = ["10.233.0.7".parse().unwrap()];
        let hosts = managed_hosts(&ips, &names, &aliases);
        assert_eq!(
            hosts,
            "# Kubernetes-managed hosts file.\n\
             127.0.0.1\tlocalhost\n\
             ::1\tlocalhost ip6-localhost ip6-loopback\n\
             fe00::0\tip6-localnet\n\
             fe00::0\tip6-mcastprefix\n\
             fe00::1\tip6-allnodes\n\
             fe00::2\tip6-allrouters\n\
             10.233.0.7\tweb-0.web.prod.svc.cluster.local\tweb-0\n\
             \n\
             # Entries added by HostAliases.\n\
             10.1.2.3\tfoo.local\tbar.local\n"
        );
    }

    #[test]
    fn hosts_file_without_subdomain_or_ip() {
        let names = pod_names(&pod("p", "default", PodSpec::default()), "c.l").unwrap();
        let hosts = managed_hosts(&["10.0.0.1".parse().unwrap()], &names, &[]);
        assert!(hosts.ends_with("fe00::2\tip6-allrouters\n10.0.0.1\tp\n"));
        let hosts = managed_hosts(&[], &names, &[]);
        assert_eq!(hosts, MANAGED_HOSTS_HEADER);
    }

    #[test]
    fn host_network_hosts_keeps_node_file() {
        let out = host_network_hosts("127.0.0.1 localhost", &[]);
        assert_eq!(
            out,
            "# Kubernetes-managed hosts file (host network).\n127.0.0.1 localhost\n"
        );
    }

    #[test]
    fn parse_and_format_resolv_conf() {
        let host = parse_resolv_conf(
            "# comment\nnameserver 1.1.1.1\nnameserver 8.8.8.8 ; x\nsearch old\n\
             search example.com. corp.\noptions rotate\noptions timeout:2\n",
        );
        assert_eq!(host.nameservers, ["1.1.1.1", "8.8.8.8"]);
        assert_eq!(host.searches, ["example.com", "corp"]);
        assert_eq!(host.options, ["rotate", "timeout:2"]);
        assert_eq!(
            format_resolv_conf(&host),
            "search example.com corp\nnameserver 1.1.1.1\nnameserver 8.8.8.8\n\
             options rotate timeout:2\n"
        );
        assert_eq!(format_resolv_conf(&DnsConfig::default()), "");
    }

    #[test]
    fn cluster_first_uses_cluster_dns_and_host_searches() {
        let host = parse_resolv_conf("nameserver 1.1.1.1\nsearch example.com\n");
        let cfg = pod_dns(
            &statefulset_pod(),
            &["10.96.0.10".into()],
            "cluster.local",
            &host,
        );
        assert_eq!(
            format_resolv_conf(&cfg),
            "search prod.svc.cluster.local svc.cluster.local cluster.local example.com\n\
             nameserver 10.96.0.10\noptions ndots:5\n"
        );
    }

    #[test]
    fn only_a_pod_asking_for_cluster_dns_misses_it() {
        let mut p = statefulset_pod();
        let dns = vec!["10.96.0.10".to_string()];
        assert!(cluster_dns_missing(&p, &[]));
        assert!(!cluster_dns_missing(&p, &dns));
        // hostNetwork with plain ClusterFirst uses the node's resolver anyway.
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert!(!cluster_dns_missing(&p, &[]));
        p.spec.as_mut().unwrap().dns_policy = Some("ClusterFirstWithHostNet".into());
        assert!(cluster_dns_missing(&p, &[]));
        p.spec.as_mut().unwrap().dns_policy = Some("Default".into());
        assert!(!cluster_dns_missing(&p, &[]));
    }

    #[test]
    fn cluster_first_falls_back_to_host() {
        let host = parse_resolv_conf("nameserver 1.1.1.1\n");
        // No cluster DNS configured.
        assert_eq!(
            pod_dns(&statefulset_pod(), &[], "cluster.local", &host),
            host
        );
        // hostNetwork with plain ClusterFirst.
        let mut p = statefulset_pod();
        p.spec.as_mut().unwrap().host_network = Some(true);
        let dns = vec!["10.96.0.10".to_string()];
        assert_eq!(pod_dns(&p, &dns, "cluster.local", &host), host);
        // ClusterFirstWithHostNet keeps cluster DNS.
        p.spec.as_mut().unwrap().dns_policy = Some("ClusterFirstWithHostNet".into());
        assert_eq!(pod_dns(&p, &dns, "cluster.local", &host).nameservers, dns);
        // Default is always the host's.
        p.spec.as_mut().unwrap().dns_policy = Some("Default".into());
        assert_eq!(pod_dns(&p, &dns, "cluster.local", &host), host);
    }

    #[test]
    fn none_policy_takes_dns_config_and_options_merge() {
        let mut p = statefulset_pod();
        let spec = p.spec.as_mut().unwrap();
        spec.dns_policy = Some("None".into());
        spec.dns_config = Some(PodDNSConfig {
            nameservers: Some(vec!["1.2.3.4".into(), "1.2.3.4".into()]),
            searches: Some(vec!["ns1.svc.example".into()]),
            options: Some(vec![
                PodDNSConfigOption {
                    name: Some("ndots".into()),
                    value: Some("2".into()),
                },
                PodDNSConfigOption {
                    name: Some("edns0".into()),
                    value: None,
                },
            ]),
        });
        let host = DnsConfig::default();
        let cfg = pod_dns(&p, &[], "cluster.local", &host);
        assert_eq!(cfg.nameservers, ["1.2.3.4"]);
        assert_eq!(cfg.searches, ["ns1.svc.example"]);
        assert_eq!(cfg.options, ["ndots:2", "edns0"]);

        // With ClusterFirst, the pod's ndots overrides the default one in place.
        p.spec.as_mut().unwrap().dns_policy = Some("ClusterFirst".into());
        let cfg = pod_dns(&p, &["10.96.0.10".into()], "cluster.local", &host);
        assert_eq!(cfg.nameservers, ["10.96.0.10", "1.2.3.4"]);
        assert_eq!(cfg.options, ["ndots:2", "edns0"]);
        assert_eq!(cfg.searches.last().unwrap(), "ns1.svc.example");
    }

    #[test]
    fn limits_apply() {
        let host = DnsConfig {
            nameservers: (1..=5).map(|i| format!("10.0.0.{i}")).collect(),
            searches: (0..40).map(|i| format!("d{i}")).collect(),
            options: vec![],
        };
        let p = pod("p", "default", PodSpec::default());
        let cfg = pod_dns(&p, &[], "cluster.local", &host);
        assert_eq!(cfg.nameservers.len(), MAX_NAMESERVERS);
        assert_eq!(cfg.searches.len(), MAX_SEARCHES);
    }

    #[test]
    fn hostname_file_has_newline() {
        assert_eq!(hostname_file("web-0"), "web-0\n");
    }
}
