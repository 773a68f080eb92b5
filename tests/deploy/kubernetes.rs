//! deploy/kubernetes/: the objects and how they refer to each other and to the image, the
//! schemas (kubernetes-validate), `kubectl kustomize`, and the pod's container started with the
//! ConfigMap and Secret, its probes asked.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::docker::{image_entrypoint, image_user};
use crate::mirror::{assert_serves_v2, status, wait_ready, Mirror, Mounts};
use crate::{
    array_at, load_config, repo, run_ok, str_at, tool, u64_at, yaml, yaml_docs, CONFIG, DATA_DIR,
};

/// The resources kustomization.yaml lists, each `(file, object)`.
fn k8s_objects() -> Vec<(String, Value)> {
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    assert_eq!(str_at(&kustomization, "/kind"), "Kustomization");
    array_at(&kustomization, "/resources")
        .iter()
        .flat_map(|file| {
            let file = file.as_str().unwrap().to_owned();
            yaml_docs(&format!("deploy/kubernetes/{file}"))
                .into_iter()
                .map(move |o| (file.clone(), o))
        })
        .collect()
}

fn k8s_kind(objects: &[(String, Value)], kind: &str) -> Value {
    let found: Vec<&Value> = objects
        .iter()
        .map(|(_, o)| o)
        .filter(|o| o["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0].clone()
}

/// A probe's or Service's port: a number, or the name of a container port.
fn container_port(container: &Value, port: &Value) -> u64 {
    match port {
        Value::String(name) => array_at(container, "/ports")
            .iter()
            .find(|p| p["name"] == name.as_str())
            .map(|p| u64_at(p, "/containerPort"))
            .unwrap_or_else(|| panic!("no container port named {name}")),
        other => other.as_u64().unwrap(),
    }
}

/// A Kubernetes quantity such as `20Gi`, in bytes.
fn quantity(q: &str) -> u64 {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
    ];
    units
        .iter()
        .find_map(|(suffix, n)| {
            q.strip_suffix(suffix)
                .map(|v| v.parse::<u64>().unwrap() * n)
        })
        .unwrap_or_else(|| q.parse().unwrap())
}

/// The Secret's values for the container's `secretKeyRef` variables.
fn k8s_env(container: &Value, secret: &Value) -> Vec<(String, String)> {
    array_at(container, "/env")
        .iter()
        .map(|e| {
            let name = str_at(e, "/name").to_owned();
            assert_eq!(
                str_at(e, "/valueFrom/secretKeyRef/name"),
                str_at(secret, "/metadata/name")
            );
            let key = str_at(e, "/valueFrom/secretKeyRef/key");
            (
                name,
                str_at(secret, &format!("/stringData/{key}")).to_owned(),
            )
        })
        .collect()
}

#[test]
fn kubernetes_manifests_fit_together() {
    let objects = k8s_objects();
    let listed: Vec<&str> = objects.iter().map(|(f, _)| f.as_str()).collect();
    for entry in std::fs::read_dir(repo("deploy/kubernetes")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            name == "kustomization.yaml" || listed.contains(&name.as_str()),
            "{name} is not in kustomization.yaml"
        );
    }
    for (file, o) in &objects {
        for key in ["/apiVersion", "/kind", "/metadata/name"] {
            assert!(!str_at(o, key).is_empty(), "{file}: {key}");
        }
        assert!(
            o.pointer("/metadata/namespace").is_none(),
            "{file}: namespace-free"
        );
    }
    let sts = k8s_kind(&objects, "StatefulSet");
    let service = k8s_kind(&objects, "Service");
    let config_map = k8s_kind(&objects, "ConfigMap");
    let secret = k8s_kind(&objects, "Secret");
    let pod = &sts["spec"]["template"]["spec"];
    let containers = array_at(pod, "/containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];

    assert_eq!(
        u64_at(&sts, "/spec/replicas"),
        1,
        "the cache is per replica"
    );
    assert_eq!(
        str_at(&sts, "/spec/serviceName"),
        str_at(&service, "/metadata/name")
    );
    assert_eq!(
        sts["spec"]["selector"]["matchLabels"],
        sts["spec"]["template"]["metadata"]["labels"]
    );
    assert_eq!(
        service["spec"]["selector"],
        sts["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        pod["enableServiceLinks"], false,
        "service links would set REGMIRROR_* variables the mirror refuses"
    );
    let (uid, gid) = image_user();
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        u64_at(pod, "/securityContext/runAsUser"),
        uid,
        "the image's USER"
    );
    assert_eq!(
        u64_at(pod, "/securityContext/fsGroup"),
        gid,
        "the image's group owns the volume"
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    // Requests for scheduling; a memory limit, no CPU limit (throttling slows every pull).
    for r in [
        "/resources/requests/cpu",
        "/resources/requests/memory",
        "/resources/limits/memory",
    ] {
        str_at(c, r);
    }
    assert!(
        c.get("command").is_none() && c.get("args").is_none(),
        "the image's entrypoint runs"
    );

    // Volumes: the claim at the data dir, the ConfigMap where the entrypoint reads its config.
    let mount_of = |name: &str| {
        let m = array_at(c, "/volumeMounts")
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no mount {name}"));
        str_at(m, "/mountPath").to_owned()
    };
    let claim = &array_at(&sts, "/spec/volumeClaimTemplates")[0];
    assert_eq!(mount_of(str_at(claim, "/metadata/name")), DATA_DIR);
    let config_volume = array_at(pod, "/volumes")
        .iter()
        .find(|v| v.get("configMap").is_some())
        .expect("a ConfigMap volume");
    assert_eq!(
        str_at(config_volume, "/configMap/name"),
        str_at(&config_map, "/metadata/name")
    );
    assert_eq!(
        format!("{}/mirror.toml", mount_of(str_at(config_volume, "/name"))),
        CONFIG
    );
    let text = str_at(&config_map, "/data/mirror.toml");
    let config = load_config(text, &k8s_env(c, &secret));
    assert!(
        config.upstream.username.is_some() && config.upstream.password.is_some(),
        "the Secret's credentials"
    );
    assert_eq!(config.data_dir, Path::new(DATA_DIR));
    let claimed = quantity(str_at(claim, "/spec/resources/requests/storage"));
    assert!(
        config.cache.max_size.0 < claimed,
        "cache.max_size must stay below the claim ({claimed} bytes)"
    );

    // Probes and the Service reach the port the configuration listens on.
    let listen = config.listen.port() as u64;
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(container_port(c, &get["port"]), listen, "{probe}");
    }
    let service_port = &array_at(&service, "/spec/ports")[0];
    assert_eq!(u64_at(service_port, "/port"), 5000);
    assert_eq!(container_port(c, &service_port["targetPort"]), listen);
}

#[test]
fn kubernetes_manifests_pass_schema_and_kustomize() {
    if let Some(validate) = tool("kubernetes-validate") {
        let files: Vec<PathBuf> = k8s_objects()
            .into_iter()
            .map(|(f, _)| repo(&format!("deploy/kubernetes/{f}")))
            .collect();
        run_ok(
            Command::new(validate)
                .args(["--strict", "--quiet"])
                .args(&files),
        );
    }
    if let Some(kubectl) = tool("kubectl") {
        let (built, _) = run_ok(
            Command::new(kubectl)
                .arg("kustomize")
                .arg(repo("deploy/kubernetes")),
        );
        let docs = serde_norway::Deserializer::from_str(&built).count();
        assert_eq!(docs, k8s_objects().len(), "kubectl kustomize:\n{built}");
    }
}

#[tokio::test]
async fn kubernetes_pod_serves_its_probes() {
    let objects = k8s_objects();
    let config_map = k8s_kind(&objects, "ConfigMap");
    let sts = k8s_kind(&objects, "StatefulSet");
    let c = &sts["spec"]["template"]["spec"]["containers"][0];
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    for (name, text) in config_map["data"].as_object().unwrap() {
        std::fs::write(etc.join(name), text.as_str().unwrap()).unwrap();
    }
    let config_dir = Path::new(CONFIG).parent().unwrap().display().to_string();
    let mounts = Mounts::new(vec![
        (config_dir, etc),
        (DATA_DIR.into(), dir.path().join("data")),
    ]);
    let env = k8s_env(c, &k8s_kind(&objects, "Secret"));
    let mut mirror = Mirror::start(&image_entrypoint(), &mounts, &env);
    let base = format!("http://{}", mirror.addr);
    assert_serves_v2(&base, None).await;
    wait_ready(&base).await;
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let path = str_at(c, &format!("/{probe}/httpGet/path"));
        let got = status(&format!("{base}{path}"), None).await;
        assert_eq!(got, 200, "{probe} {path}");
    }
    let grace = u64_at(&sts, "/spec/template/spec/terminationGracePeriodSeconds");
    let exit = mirror.terminate(Duration::from_secs(grace)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "SIGTERM: {exit:?}; log:\n{}",
        mirror.log()
    );
}
