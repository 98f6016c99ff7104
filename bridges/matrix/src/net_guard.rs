//! Which addresses the gateway reaches on a user's word.
//!
//! A user can make the gateway connect somewhere twice over: by sending a file
//! link (fetched by [`crate::media::Fetcher`]) and by logging in to a homeserver
//! URL. Neither may lead to the gateway's own machine or network unless the admin
//! said so: [`is_public`] tells public addresses from loopback, private,
//! link-local and reserved ones, and [`check_homeserver`] refuses a login to a
//! homeserver at such an address unless `allowed_homeservers` lists it.

use std::net::IpAddr;

use isthmus_config::MatrixNetworkConfig;

pub use isthmus_core::media::is_public;

/// Whether users may log in to `homeserver` as far as its address goes: one
/// listed in `allowed_homeservers` may be anywhere; any other must be an IP
/// address that [`is_public`], or a name all of whose addresses are. `Err` says why
/// not, for the user.
pub async fn check_homeserver(config: &MatrixNetworkConfig, homeserver: &str) -> Result<(), String> {
    if config.lists_homeserver(homeserver) {
        return Ok(());
    }
    let url = url::Url::parse(homeserver).map_err(|e| format!("`{homeserver}` is not a homeserver URL: {e}"))?;
    let port = url.port_or_known_default().unwrap_or(443);
    let addresses: Vec<IpAddr> = match url.host() {
        Some(url::Host::Ipv4(v4)) => vec![IpAddr::V4(v4)],
        Some(url::Host::Ipv6(v6)) => vec![IpAddr::V6(v6)],
        Some(url::Host::Domain(name)) => tokio::net::lookup_host((name, port))
            .await
            .map_err(|e| format!("cannot find the address of {name}: {e}"))?
            .map(|a| a.ip())
            .collect(),
        None => return Err(format!("`{homeserver}` names no host")),
    };
    match addresses.into_iter().find(|ip| !is_public(*ip)) {
        None => Ok(()),
        Some(ip) => {
            let host = url.host_str().unwrap_or_default();
            let what = if ip.is_loopback() { "a loopback address" } else { "a private, local or reserved address" };
            Err(format!(
                "{host} is {what} ({ip}): this gateway logs in only to homeservers at public addresses, \
                 unless its admin lists the homeserver in `allowed_homeservers`"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an IP address")
    }

    #[test]
    fn only_public_addresses_are_public() {
        for a in [
            "127.0.0.1",
            "127.1.2.3",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.1",
            "203.0.113.1",
            "::1",
            "::",
            "::127.0.0.1",
            "::10.0.0.1",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "fec0::1",
            "feff::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::808:808",
            "2002:7f00:1::1",
            "2002:808:808::1",
            "2001:db8::1",
            "100::1",
            "64:ff9b:1::1",
        ] {
            assert!(!is_public(ip(a)), "{a}");
        }
        for a in [
            "93.184.216.34",
            "172.32.0.1",
            "100.128.0.1",
            "192.0.1.1",
            "198.17.255.255",
            "198.20.0.1",
            "8.8.8.8",
            "2606:4700::1111",
            "2a01:4f8::1",
            "::ffff:93.184.216.34",
            "::8.8.8.8",
            "64:ff9b:2::1",
        ] {
            assert!(is_public(ip(a)), "{a}");
        }
    }

    fn network(allowed: &str) -> MatrixNetworkConfig {
        let yaml = format!(
            "xmpp:\n  component: {{ secret: s }}\naccess: {{ allow: [\"*\"] }}\nmatrix:\n  - domain: m.localhost\n    allowed_homeservers: {allowed}\n"
        );
        let config = isthmus_config::from_str(&yaml, std::path::Path::new("t.yaml")).expect("valid");
        config.matrix[0].clone()
    }

    #[tokio::test]
    async fn homeservers_at_private_addresses_must_be_listed() {
        let open = network("[]");
        for hs in [
            "http://127.0.0.1:8008",
            "http://localhost:8008",
            "https://10.0.0.5",
            "https://[::1]:8448",
            "https://[fd00::5]",
            "http://169.254.169.254",
            "http://100.64.1.1",
            "http://[64:ff9b::a00:1]",
        ] {
            let e = check_homeserver(&open, hs).await.expect_err(hs);
            assert!(e.contains("unless its admin lists the homeserver in `allowed_homeservers`"), "{hs}: {e}");
        }
        let e = check_homeserver(&open, "http://127.0.0.1:8008").await.expect_err("loopback");
        assert!(e.starts_with("127.0.0.1 is a loopback address (127.0.0.1)"), "{e}");
        let e = check_homeserver(&open, "http://localhost:8008").await.expect_err("a name for loopback");
        assert!(e.starts_with("localhost is a loopback address"), "{e}");
        // A public address (no lookup needed for an IP literal).
        check_homeserver(&open, "https://93.184.216.34").await.expect("public");
        // Listed explicitly: allowed wherever it is (the URL compared without a trailing `/` or case).
        let listed = network("[\"http://127.0.0.1:8008\", \"http://LOCALHOST:8008/\"]");
        check_homeserver(&listed, "http://127.0.0.1:8008/").await.expect("listed");
        check_homeserver(&listed, "http://localhost:8008").await.expect("listed by name");
        assert!(check_homeserver(&listed, "http://127.0.0.1:8009").await.is_err(), "another port is not listed");
    }
}
