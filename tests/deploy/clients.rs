//! deploy/clients/: each example parses and points at the mirror as the README says.

use serde_json::Value;

use crate::{array_at, read};

#[test]
fn client_examples_parse_and_point_at_the_mirror() {
    let daemon: Value =
        serde_json::from_str(&read("deploy/clients/daemon.json")).expect("daemon.json is JSON");
    for m in array_at(&daemon, "/registry-mirrors") {
        let url = url::Url::parse(m.as_str().unwrap()).expect("a mirror URL");
        assert_eq!(url.port(), Some(5000), "{url}");
    }
    for (file, server) in [
        ("hosts.toml", "https://registry-1.docker.io"),
        ("hosts-ghcr.io.toml", "https://ghcr.io"),
        ("hosts-tls.toml", "https://registry-1.docker.io"),
    ] {
        let hosts: toml::Table = toml::from_str(&read(&format!("deploy/clients/{file}")))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(hosts["server"].as_str(), Some(server), "{file}");
        let host = hosts["host"].as_table().expect("a [host.\"...\"] table");
        for (url, h) in host {
            assert!(url.ends_with(":5000"), "{file}: {url}");
            let caps: Vec<&str> = h["capabilities"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|c| c.as_str())
                .collect();
            assert!(
                caps.contains(&"pull") && caps.contains(&"resolve"),
                "{file}: {caps:?}"
            );
        }
    }
    let conf: toml::Table =
        toml::from_str(&read("deploy/clients/registries.conf")).expect("registries.conf is TOML");
    for registry in conf["registry"].as_array().unwrap() {
        let prefix = registry["prefix"].as_str().unwrap();
        for mirror in registry["mirror"].as_array().unwrap() {
            let location = mirror["location"].as_str().unwrap();
            // Docker Hub is the default upstream; any other registry names itself as a path.
            let want_path = if prefix == "docker.io" { "" } else { prefix };
            let path = location.split_once('/').map_or("", |(_, p)| p);
            assert_eq!(
                path, want_path,
                "registries.conf: mirror of {prefix} at {location}"
            );
        }
    }
}
