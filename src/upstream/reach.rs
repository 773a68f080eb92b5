//! Where an upstream's answers may send the mirror: which token realms get
//! the upstream credentials (same scheme, host and port, Docker Hub's
//! `auth.docker.io`, or `credential_hosts`), and which redirect and realm
//! targets are followed at all (no https → http downgrade, no loopback,
//! link-local or private address unless the upstream is itself on one).
//! Decisions are pure functions of URLs and addresses; the only I/O is the
//! name lookup of [`Reach::check`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tokio::sync::OnceCell;
use url::{Host, Url};

use crate::error::Error;

/// Docker Hub's registry host and the token host it sends clients to.
const HUB_REGISTRY: &str = "registry-1.docker.io";
const HUB_AUTH: &str = "auth.docker.io";

/// Whether `realm` may receive the credentials of the upstream at `base`.
///
/// The upstream's own origin (scheme, host and port: the same host on another
/// port is another service, and http would send them in clear), Docker Hub's
/// token host over https, or a `credential_hosts` entry: `host` (any port) or
/// `host:port`, over https unless the upstream itself is plain http.
pub fn may_receive_credentials(base: &Url, credential_hosts: &[String], realm: &Url) -> bool {
    let Some(host) = realm.host_str() else {
        return false;
    };
    if realm.origin() == base.origin() {
        return true;
    }
    let secure = realm.scheme() == "https" || base.scheme() == "http";
    if !secure {
        return false;
    }
    let port = realm.port_or_known_default();
    let hub_auth = base.host_str() == Some(HUB_REGISTRY)
        && host == HUB_AUTH
        && realm.scheme() == "https"
        && port == Some(443);
    if hub_auth {
        return true;
    }
    credential_hosts.iter().any(|entry| {
        let (h, p) = split_host_port(entry);
        h.eq_ignore_ascii_case(host) && p.is_none_or(|p| Some(p) == port)
    })
}

/// `host` or `host:port` (`[v6]:port` too); a port that does not parse is
/// part of the host, which then matches nothing.
fn split_host_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[') {
        if let Some((h, tail)) = rest.split_once(']') {
            let port = tail.strip_prefix(':').and_then(|p| p.parse().ok());
            return (h, port);
        }
    }
    match entry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(p) => (h, Some(p)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    }
}

/// An address a registry on the internet has no business sending the mirror
/// to: loopback, private, link-local, carrier-grade NAT, unspecified,
/// unique-local, or such an IPv4 address mapped into IPv6.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => internal_v4(v4),
            None => internal_v6(v6),
        },
    }
}

fn internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || (a == 100 && (64..128).contains(&b))
}

fn internal_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
}

/// `localhost` and its subdomains resolve to loopback by definition (RFC 6761).
fn is_localhost(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// Why a redirect or realm target is refused by the URL alone, if it is;
/// `upstream_internal` says the upstream itself is on an internal address.
pub fn refusal(base: &Url, upstream_internal: bool, target: &Url) -> Option<&'static str> {
    if !matches!(target.scheme(), "http" | "https") {
        return Some("is not http(s)");
    }
    if base.scheme() == "https" && target.scheme() == "http" {
        return Some("downgrades https to http");
    }
    if upstream_internal {
        return None;
    }
    match target.host() {
        Some(Host::Ipv4(ip)) if is_internal(ip.into()) => Some("is an internal address"),
        Some(Host::Ipv6(ip)) if is_internal(ip.into()) => Some("is an internal address"),
        Some(Host::Domain(d)) if is_localhost(d) => Some("is an internal address"),
        None => Some("has no host"),
        _ => None,
    }
}

/// The rule for one upstream, with what its own host was found to be.
#[derive(Debug)]
pub struct Reach {
    base: Url,
    /// Whether the upstream is on an internal address: known from an IP
    /// literal at once, from a name at its first lookup.
    internal: OnceCell<bool>,
}

impl Reach {
    pub fn new(base: &Url) -> Self {
        let internal = match base.host() {
            Some(Host::Ipv4(ip)) => OnceCell::new_with(Some(is_internal(ip.into()))),
            Some(Host::Ipv6(ip)) => OnceCell::new_with(Some(is_internal(ip.into()))),
            Some(Host::Domain(d)) if is_localhost(d) => OnceCell::new_with(Some(true)),
            _ => OnceCell::new(),
        };
        Self {
            base: base.clone(),
            internal,
        }
    }

    /// Refuses a redirect or token realm `target` (`what` names it) that
    /// downgrades to http or leads to an internal address, by literal or by
    /// what its name resolves to, unless the upstream is internal itself.
    pub async fn check(&self, target: &Url, what: &str) -> Result<(), Error> {
        let refused = |why: &str| {
            tracing::warn!(
                target_host = target.host_str().unwrap_or(""),
                "upstream {what} refused: it {why}"
            );
            Err(Error::UpstreamFailed(format!(
                "upstream {what} refused: it {why}"
            )))
        };
        let internal = self.upstream_internal().await;
        if let Some(why) = refusal(&self.base, internal, target) {
            return refused(why);
        }
        if internal || target.host_str() == self.base.host_str() {
            return Ok(());
        }
        if let Some(Host::Domain(name)) = target.host() {
            if resolves_internal(name).await {
                return refused("resolves to an internal address");
            }
        }
        Ok(())
    }

    async fn upstream_internal(&self) -> bool {
        *self
            .internal
            .get_or_init(|| async {
                match self.base.host() {
                    Some(Host::Domain(d)) => resolves_internal(d).await,
                    _ => false,
                }
            })
            .await
    }
}

/// Whether any address `name` resolves to is internal (a name that does not
/// resolve is left to the request to fail on).
async fn resolves_internal(name: &str) -> bool {
    match tokio::net::lookup_host((name, 0)).await {
        Ok(addrs) => addrs.into_iter().any(|a| is_internal(a.ip())),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn credentials_go_to_the_same_origin_only() {
        let base = url("https://registry.example");
        let ok = |realm: &str| may_receive_credentials(&base, &[], &url(realm));
        assert!(ok("https://registry.example/token"));
        assert!(ok("https://registry.example:443/token"));
        assert!(!ok("http://registry.example/token"), "in clear text");
        assert!(!ok("https://registry.example:8443/token"), "another port");
        assert!(!ok("https://auth.registry.example/token"), "another host");

        let plain = url("http://127.0.0.1:5000");
        assert!(may_receive_credentials(
            &plain,
            &[],
            &url("http://127.0.0.1:5000/token")
        ));
        assert!(!may_receive_credentials(
            &plain,
            &[],
            &url("http://127.0.0.1:5001/token")
        ));
    }

    #[test]
    fn docker_hubs_token_host_only_over_https() {
        let hub = url("https://registry-1.docker.io");
        let ok = |realm: &str| may_receive_credentials(&hub, &[], &url(realm));
        assert!(ok("https://auth.docker.io/token"));
        assert!(!ok("http://auth.docker.io/token"));
        assert!(!ok("https://auth.docker.io:8443/token"));
        assert!(!may_receive_credentials(
            &url("https://ghcr.io"),
            &[],
            &url("https://auth.docker.io/token")
        ));
    }

    #[test]
    fn credential_hosts_name_a_host_or_a_host_and_port() {
        let base = url("https://registry.example");
        let hosts = vec!["AUTH.example".to_owned(), "sso.example:8443".to_owned()];
        let ok = |realm: &str| may_receive_credentials(&base, &hosts, &url(realm));
        assert!(ok("https://auth.example/token"));
        assert!(
            ok("https://auth.example:9000/token"),
            "a bare host: any port"
        );
        assert!(ok("https://sso.example:8443/token"));
        assert!(!ok("https://sso.example/token"), "another port than named");
        assert!(
            !ok("http://auth.example/token"),
            "https upstream: https only"
        );
        // An http upstream sends its credentials in clear anyway.
        let plain = url("http://registry.example");
        assert!(may_receive_credentials(
            &plain,
            &hosts,
            &url("http://auth.example/token")
        ));
        assert_eq!(split_host_port("[::1]:80"), ("::1", Some(80)));
        assert_eq!(split_host_port("h:x"), ("h:x", None));
    }

    #[test]
    fn internal_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn targets_refused_by_their_url() {
        let public = url("https://registry.example");
        let no = |target: &str| refusal(&public, false, &url(target));
        assert_eq!(no("https://cdn.example/blob"), None);
        assert_eq!(
            no("http://cdn.example/blob"),
            Some("downgrades https to http")
        );
        assert!(no("https://169.254.169.254/latest/meta-data").is_some());
        assert!(no("https://127.0.0.1:8080/").is_some());
        assert!(no("https://[::1]/").is_some());
        assert!(no("https://10.0.0.5/").is_some());
        assert!(no("https://localhost/").is_some());
        assert!(no("ftp://cdn.example/").is_some());
        // An upstream on a private address may use its neighbours (a
        // registry redirecting to its object store), but not downgrade.
        let internal = url("https://10.0.0.5");
        assert_eq!(refusal(&internal, true, &url("https://10.0.0.6/b")), None);
        assert!(refusal(&internal, true, &url("http://10.0.0.6/b")).is_some());
        let plain = url("http://10.0.0.5");
        assert_eq!(refusal(&plain, true, &url("http://127.0.0.1:9/b")), None);
    }

    #[tokio::test]
    async fn names_are_checked_by_what_they_resolve_to() {
        let reach = Reach::new(&url("https://registry.example"));
        // Seed the upstream as public: the test must not depend on DNS.
        reach.internal.set(false).unwrap();
        let e = reach
            .check(&url("https://localhost.:1/x"), "redirect")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("internal address"), "{e}");
        assert!(reach
            .check(&url("https://registry.example/x"), "redirect")
            .await
            .is_ok());
        assert!(resolves_internal("localhost").await);
        let lab = Reach::new(&url("http://localhost:5000"));
        assert!(lab
            .check(&url("http://127.0.0.1:5001/token"), "token realm")
            .await
            .is_ok());
    }
}
