//! Image references with docker-style normalisation: `busybox` is
//! `docker.io/library/busybox:latest`, a registry is recognised by a `.`, a `:` or the name
//! `localhost` in the first path component, and a digest follows `@`.

use std::fmt;

/// The registry name docker uses when a reference names none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
const DEFAULT_TAG: &str = "latest";

/// A parsed, normalised image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// e.g. `docker.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// e.g. `library/busybox`, `nodelet/busybox`.
    pub repository: String,
    /// The tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses and normalises `input`; the error text says what is wrong.
    pub fn parse(input: &str) -> Result<Self, String> {
        if input.is_empty() {
            return Err("empty reference".into());
        }
        if input.trim() != input {
            return Err("reference contains whitespace".into());
        }
        let (name_tag, digest) = match input.split_once('@') {
            Some((n, d)) => {
                validate_digest(d)?;
                (n, Some(d.to_string()))
            }
            None => (input, None),
        };
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                (&name_tag[..i], Some(name_tag[i + 1..].to_string()))
            }
            None => (name_tag, None),
        };
        if let Some(t) = &tag {
            validate_tag(t)?;
        }
        let (registry, mut repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" {
            DEFAULT_REGISTRY.to_string()
        } else {
            registry
        };
        if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        validate_registry(&registry)?;
        validate_repository(&repository)?;
        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (t, _) => t,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository`, the name without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// What to ask the registry's manifest endpoint for: the digest if given, else the tag.
    pub fn object(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or(DEFAULT_TAG)
    }

    /// The host to talk to for this registry (docker.io's API lives elsewhere).
    pub fn api_host(&self) -> &str {
        if self.registry == DEFAULT_REGISTRY {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// Registries on the loopback are spoken to over plain HTTP, all others over HTTPS.
    pub fn is_insecure(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
            _ => self.registry.as_str(),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// `scheme://host` of the registry API.
    pub fn base_url(&self) -> String {
        let scheme = if self.is_insecure() { "http" } else { "https" };
        format!("{scheme}://{}", self.api_host())
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Checks `sha256:<64 lowercase hex>`.
pub fn validate_digest(d: &str) -> Result<(), String> {
    match d.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) => {
            Ok(())
        }
        _ => Err(format!("invalid digest {d:?}")),
    }
}

fn validate_tag(t: &str) -> Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 128
        && t.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid tag {t:?}"))
    }
}

fn validate_registry(registry: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, p)) => (h, p.strip_prefix(':').or(Some(""))),
            None => ("", None),
        }
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (registry, None),
        }
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(format!("invalid registry {registry:?}"))
    }
}

fn validate_repository(repo: &str) -> Result<(), String> {
    for component in repo.split('/') {
        let valid = !component.is_empty()
            && component.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            })
            && component.starts_with(|c: char| c.is_ascii_alphanumeric())
            && component.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !valid {
            return Err(format!("invalid repository path component {component:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_hub_short_names_are_normalised() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert!(!r.is_insecure());
        let r = Reference::parse("user/app:1.2").unwrap();
        assert_eq!(r.to_string(), "docker.io/user/app:1.2");
        let r = Reference::parse("index.docker.io/library/nginx").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/nginx:latest");
    }

    #[test]
    fn registry_with_port_and_tag() {
        let r = Reference::parse("127.0.0.1:5000/nodelet/busybox:latest").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "nodelet/busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert!(r.is_insecure());
        assert_eq!(r.base_url(), "http://127.0.0.1:5000");
        let r = Reference::parse("localhost:5000/a").unwrap();
        assert!(r.is_insecure());
        assert_eq!(r.to_string(), "localhost:5000/a:latest");
        let r = Reference::parse("localhost/a").unwrap();
        assert_eq!(r.registry, "localhost");
        assert!(Reference::parse("quay.io/x/y").unwrap().base_url() == "https://quay.io");
    }

    #[test]
    fn digests_keep_no_default_tag() {
        let r = Reference::parse(&format!("127.0.0.1:5000/nodelet/busybox@{D}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.object(), D);
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/nodelet/busybox@{D}"));
        let r = Reference::parse(&format!("busybox:1@{D}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.object(), D);
        assert_eq!(r.name(), "docker.io/library/busybox");
    }

    #[test]
    fn invalid_references_are_refused() {
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "busybox@sha256:abc",
            "busybox@md5:0123",
            "a//b",
            "a/-b",
            " busybox",
            "busybox:bad/tag",
            "busybox:-x",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
