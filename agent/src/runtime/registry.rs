//! Nodelet's side of the OCI distribution client (`oci-client`, which speaks the protocol:
//! manifests, blobs, the `/v2/` ping and the bearer-token flow of a 401 challenge, basic auth):
//! image names parsed and normalised as docker does (`busybox` is
//! `docker.io/library/busybox:latest`) into oci-client's `Reference`, one client per pull so that a pull's credentials and
//! tokens serve that pull alone (oci-client keeps the first credentials a client is given for a
//! registry, and its tokens, for the client's life), plain HTTP for registries on the
//! loopback (HTTPS for all others: oci-client's own exception is a fixed list of registry
//! names, which cannot say "any loopback address and port", hence `is_loopback` here), and its
//! errors turned into the runtime's.
//!
//! Image names are parsed here by hand, not by `Reference`'s `FromStr`: oci-spec's parser
//! compiles a regular expression (Unicode `\w` repeated up to 128 times) into about 7 MB of heap
//! on first use, kept for the life of the process, on an agent whose whole idle heap is about
//! 1 MB (test `a_parse_leaves_little_heap_behind`).

use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth as Credentials;
pub use oci_client::Reference;

use super::{RegistryAuth, RuntimeError};

/// Parses and normalises an image name; a name docker would refuse is InvalidImageName.
pub fn parse(image: &str) -> Result<Reference, RuntimeError> {
    parse_parts(image).map_err(|detail| RuntimeError::InvalidReference {
        image: image.to_string(),
        detail,
    })
}

/// The registry docker uses when a name gives none.
const DOCKER_HUB: &str = "docker.io";

/// docker's grammar: `[registry/]repository[:tag][@digest]`, where the first path component
/// is a registry when it has a `.` or a `:` or is `localhost`; Docker Hub's one-component
/// names are in `library/`; without tag or digest the tag is `latest`.
fn parse_parts(input: &str) -> Result<Reference, String> {
    if input.is_empty() {
        return Err("empty reference".into());
    }
    if input.trim() != input {
        return Err("reference contains whitespace".into());
    }
    let (name_tag, digest) = match input.split_once('@') {
        Some((n, d)) => (n, Some(valid_digest(d)?)),
        None => (input, None),
    };
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => {
            let i = last_slash + i;
            (&name_tag[..i], Some(valid_tag(&name_tag[i + 1..])?))
        }
        None => (name_tag, None),
    };
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
            (first, rest.to_string())
        }
        _ => (DOCKER_HUB, name.to_string()),
    };
    let registry = match registry {
        "index.docker.io" => DOCKER_HUB.to_string(),
        other => valid_registry(other)?,
    };
    let repository = match registry == DOCKER_HUB && !repository.contains('/') {
        true => format!("library/{repository}"),
        false => repository,
    };
    valid_repository(&repository)?;
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => Reference::with_tag_and_digest(registry, repository, t, d),
        (None, Some(d)) => Reference::with_digest(registry, repository, d),
        (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest".into())),
    })
}

/// `algorithm:hex` with a supported algorithm and its length of lowercase hex.
fn valid_digest(d: &str) -> Result<String, String> {
    let length = match d.split_once(':') {
        Some(("sha256", hex)) => (hex, 64),
        Some(("sha384", hex)) => (hex, 96),
        Some(("sha512", hex)) => (hex, 128),
        _ => return Err(format!("invalid digest {d:?}")),
    };
    let (hex, len) = length;
    match hex.len() == len && hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
        true => Ok(d.to_string()),
        false => Err(format!("invalid digest {d:?}")),
    }
}

fn valid_tag(t: &str) -> Result<String, String> {
    let ok = t.len() <= 128
        && t.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    match ok {
        true => Ok(t.to_string()),
        false => Err(format!("invalid tag {t:?}")),
    }
}

fn valid_registry(registry: &str) -> Result<String, String> {
    let (host, port) = match registry.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, p)) => (h, p.strip_prefix(':').or(Some(""))),
            None => ("", None),
        },
        None => match registry.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (registry, None),
        },
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    match host_ok && port_ok {
        true => Ok(registry.to_string()),
        false => Err(format!("invalid registry {registry:?}")),
    }
}

fn valid_repository(repo: &str) -> Result<(), String> {
    if repo.len() > 255 {
        return Err("repository name longer than 255 characters".into());
    }
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

/// `registry/repository`: the name without tag or digest (the kubelet's parsed repository).
pub fn name(reference: &Reference) -> String {
    format!("{}/{}", reference.registry(), reference.repository())
}

/// Registries on the loopback (`localhost`, 127.0.0.0/8, ::1, with any port) are spoken to
/// over plain HTTP, all others over HTTPS.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A client for one pull from `reference`'s registry.
pub fn client(reference: &Reference) -> oci_client::Client {
    let protocol = if is_loopback(reference.resolve_registry()) {
        ClientProtocol::Http
    } else {
        ClientProtocol::Https
    };
    oci_client::Client::new(ClientConfig {
        protocol,
        connect_timeout: Some(Duration::from_secs(15)),
        read_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    })
}

/// The credentials of a pull (anonymous without a matching pull secret).
pub fn credentials(auth: Option<&RegistryAuth>) -> Credentials {
    match auth {
        Some(a) => Credentials::Basic(a.username.clone(), a.password.clone()),
        None => Credentials::Anonymous,
    }
}

/// The runtime error of a failed registry request: ImageNotFound when the registry says the
/// repository, tag, manifest or blob does not exist, a pull error otherwise.
pub fn error(image: &str, e: OciDistributionError) -> RuntimeError {
    let unknown = |code: &OciErrorCode| {
        matches!(
            code,
            OciErrorCode::ManifestUnknown
                | OciErrorCode::NameUnknown
                | OciErrorCode::BlobUnknown
                | OciErrorCode::NotFound
        )
    };
    let not_found = match &e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::RegistryError { envelope, .. } => {
            envelope.errors.iter().any(|err| unknown(&err.code))
        }
        OciDistributionError::ServerError { code, .. } => *code == 404,
        _ => false,
    };
    // The registry's own words where it gave some ("…/manifests/latest: manifest unknown").
    let detail = match &e {
        OciDistributionError::RegistryError { envelope, url } => {
            let words: Vec<&str> = envelope.errors.iter().map(|e| e.message.as_str()).collect();
            format!("{url}: {}", words.join("; "))
        }
        other => other.to_string(),
    };
    if not_found {
        RuntimeError::ImageNotFound {
            image: image.to_string(),
            detail,
        }
    } else {
        RuntimeError::Pull {
            image: image.to_string(),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_hub_short_names_are_normalised() {
        let r = parse("busybox").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert!(!is_loopback(r.resolve_registry()));
        let r = parse("user/app:1.2").unwrap();
        assert_eq!(r.to_string(), "docker.io/user/app:1.2");
        let r = parse("index.docker.io/library/nginx").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/nginx:latest");
        assert_eq!(name(&r), "docker.io/library/nginx");
    }

    #[test]
    fn registry_with_port_and_tag() {
        let r = parse("127.0.0.1:5000/nodelet/busybox:latest").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "nodelet/busybox");
        assert_eq!(r.tag(), Some("latest"));
        assert!(is_loopback(r.resolve_registry()));
        let r = parse("localhost:5000/a").unwrap();
        assert!(is_loopback(r.registry()));
        assert_eq!(r.to_string(), "localhost:5000/a:latest");
        let r = parse("localhost/a").unwrap();
        assert_eq!(r.registry(), "localhost");
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("quay.io"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }

    #[test]
    fn digests_keep_no_default_tag() {
        let r = parse(&format!("127.0.0.1:5000/nodelet/busybox@{D}")).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest(), Some(D));
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/nodelet/busybox@{D}"));
        let r = parse(&format!("busybox:1@{D}")).unwrap();
        assert_eq!(r.tag(), Some("1"));
        assert_eq!(r.to_string(), format!("docker.io/library/busybox:1@{D}"));
        assert_eq!(name(&r), "docker.io/library/busybox");
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
            "127.0.0.1:5000/Bad/Name",
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.reason(), "InvalidImageName", "{bad:?}");
        }
    }

    #[test]
    fn a_parse_leaves_little_heap_behind() {
        let before = crate::heap::live();
        let r = parse(&format!("127.0.0.1:5000/nodelet/busybox:1@{D}")).unwrap();
        let left = crate::heap::live() - before;
        drop(r);
        assert!(left < 4096, "{left} bytes live after one parse");
    }

    #[test]
    fn only_what_the_registry_says_is_unknown_is_not_found() {
        let envelope = |code: &str| {
            let body = format!(r#"{{"errors":[{{"code":"{code}","message":"m"}}]}}"#);
            OciDistributionError::RegistryError {
                envelope: serde_json::from_str(&body).unwrap(),
                url: "http://r/v2/a/manifests/x".into(),
            }
        };
        let kind = |e| match error("r/a:x", e) {
            RuntimeError::ImageNotFound { .. } => "not found",
            RuntimeError::Pull { .. } => "pull",
            _ => "other",
        };
        assert_eq!(kind(envelope("MANIFEST_UNKNOWN")), "not found");
        assert_eq!(kind(envelope("NAME_UNKNOWN")), "not found");
        assert_eq!(kind(envelope("DENIED")), "pull");
        let unauthorized = OciDistributionError::UnauthorizedError { url: "u".into() };
        assert_eq!(kind(unauthorized), "pull");
        let plain_404 = OciDistributionError::ServerError {
            code: 404,
            url: "u".into(),
            message: "404 page not found".into(),
        };
        assert_eq!(kind(plain_404), "not found");
    }
}
