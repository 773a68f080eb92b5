//! deploy/kubernetes/: the objects and how they refer to each other and to the image, the
//! schemas (kubernetes-validate), `kubectl kustomize`, and the pod's container started with the
//! ConfigMap and Secret, its probes asked. deploy/kubernetes/cluster/, the replicas sharing one
//! cache: the same, and each pod's environment as the kubelet would make it (the pod's IP, the
//! Secret's keys) loaded with the ConfigMap; its https placeholder swapped for an in-cluster
//! http bucket, refused until its commented `allow_http = true` is set.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::docker::{image_entrypoint, image_user};
use crate::mirror::{assert_serves_v2, status, wait_ready, Mirror, Mounts};
use crate::{
    array_at, load_config, repo, run_ok, str_at, tool, u64_at, yaml, yaml_docs, CONFIG, DATA_DIR,
};

const SINGLE: &str = "deploy/kubernetes";
const CLUSTER: &str = "deploy/kubernetes/cluster";

/// The resources kustomization.yaml lists, each `(file, object)`.
fn k8s_objects() -> Vec<(String, Value)> {
    k8s_objects_in(SINGLE)
}

/// The resources the kustomization.yaml of `dir` (a repository path) lists.
fn k8s_objects_in(dir: &str) -> Vec<(String, Value)> {
    let kustomization = yaml(&format!("{dir}/kustomization.yaml"));
    assert_eq!(str_at(&kustomization, "/kind"), "Kustomization");
    array_at(&kustomization, "/resources")
        .iter()
        .flat_map(|file| {
            let file = file.as_str().unwrap().to_owned();
            yaml_docs(&format!("{dir}/{file}"))
                .into_iter()
                .map(move |o| (file.clone(), o))
        })
        .collect()
}

/// Every file of `dir` is in its kustomization, and every object is namespace-free.
fn assert_all_listed(dir: &str, objects: &[(String, Value)]) {
    let listed: Vec<&str> = objects.iter().map(|(f, _)| f.as_str()).collect();
    for entry in std::fs::read_dir(repo(dir)).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            continue; // a kustomization of its own (cluster/)
        }
        let name = entry.file_name().into_string().unwrap();
        assert!(
            name == "kustomization.yaml" || listed.contains(&name.as_str()),
            "{dir}/{name} is not in its kustomization.yaml"
        );
    }
    for (file, o) in objects {
        for key in ["/apiVersion", "/kind", "/metadata/name"] {
            assert!(!str_at(o, key).is_empty(), "{file}: {key}");
        }
        assert!(
            o.pointer("/metadata/namespace").is_none(),
            "{file}: namespace-free"
        );
    }
}

/// The object of `kind` named `name`.
fn k8s_named(objects: &[(String, Value)], kind: &str, name: &str) -> Value {
    let found: Vec<&Value> = objects
        .iter()
        .map(|(_, o)| o)
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} named {name}");
    found[0].clone()
}

/// Whether a label selector (`matchLabels`, or a Service's map) selects `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.get("matchLabels").unwrap_or(selector);
    selector
        .as_object()
        .expect("a label map")
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
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
    assert_all_listed(SINGLE, &objects);
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
    assert_pod_runs_the_image(pod, c);

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

    assert_probes_and_service_reach(c, &service, config.listen.port());
}

/// The pod as the image expects to run: its user, no privileges, a read-only root, its
/// entrypoint, no service links.
fn assert_pod_runs_the_image(pod: &Value, c: &Value) {
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
}

/// Probes and the Service reach the port the configuration listens on.
fn assert_probes_and_service_reach(c: &Value, service: &Value, listen: u16) {
    let listen = u64::from(listen);
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(container_port(c, &get["port"]), listen, "{probe}");
    }
    let service_port = &array_at(service, "/spec/ports")[0];
    assert_eq!(u64_at(service_port, "/port"), 5000);
    assert_eq!(container_port(c, &service_port["targetPort"]), listen);
}

#[test]
fn kubernetes_manifests_pass_schema_and_kustomize() {
    assert_schema_and_kustomize(SINGLE);
}

fn assert_schema_and_kustomize(dir: &str) {
    let objects = k8s_objects_in(dir);
    if let Some(validate) = tool("kubernetes-validate") {
        let mut files: Vec<PathBuf> = objects
            .iter()
            .map(|(f, _)| repo(&format!("{dir}/{f}")))
            .collect();
        files.dedup();
        run_ok(
            Command::new(validate)
                .args(["--strict", "--quiet"])
                .args(&files),
        );
    }
    if let Some(kubectl) = tool("kubectl") {
        let (built, _) = run_ok(Command::new(kubectl).arg("kustomize").arg(repo(dir)));
        let docs = serde_norway::Deserializer::from_str(&built).count();
        assert_eq!(docs, objects.len(), "kubectl kustomize {dir}:\n{built}");
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

/// The pod's IP the cluster tests give the kubelet's `status.podIP`.
const POD_IP: &str = "10.0.0.7";

/// A container's environment as the kubelet makes it: `value`s with `$(VAR)` of the variables
/// before them expanded, `status.podIP` as [`POD_IP`], `secretKeyRef`s from the Secrets among
/// `objects` (an optional key that is absent is left out). Also the names that came from a
/// Secret.
fn k8s_pod_env(
    container: &Value,
    objects: &[(String, Value)],
) -> (Vec<(String, String)>, Vec<String>) {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut from_secret = Vec::new();
    for e in container
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = str_at(e, "/name").to_owned();
        let value = if let Some(v) = e.get("value") {
            let mut v = v.as_str().expect("a string value").to_owned();
            for (k, val) in &env {
                v = v.replace(&format!("$({k})"), val);
            }
            assert!(
                !v.contains("$("),
                "{name}: {v} refers to a variable not defined before it"
            );
            v
        } else if let Some(f) = e.pointer("/valueFrom/fieldRef") {
            assert_eq!(str_at(f, "/fieldPath"), "status.podIP", "{name}");
            POD_IP.to_owned()
        } else {
            let r = e
                .pointer("/valueFrom/secretKeyRef")
                .unwrap_or_else(|| panic!("{name}: a value, the pod's IP or a secretKeyRef"));
            let secret = k8s_named(objects, "Secret", str_at(r, "/name"));
            let key = str_at(r, "/key");
            match secret.pointer(&format!("/stringData/{key}")) {
                Some(v) => {
                    from_secret.push(name.clone());
                    v.as_str().unwrap().to_owned()
                }
                None if r["optional"] == true => continue,
                None => panic!("{name}: the Secret has no key {key}"),
            }
        };
        env.push((name, value));
    }
    (env, from_secret)
}

/// Variables whose values are secrets: the mirror's credentials, the Redis URL, the peer
/// secret, Redis' password.
fn is_secret_var(name: &str) -> bool {
    [
        "REGMIRROR_UPSTREAM_USERNAME",
        "REGMIRROR_UPSTREAM_PASSWORD",
        "REGMIRROR_STORAGE_S3_ACCESS_KEY_ID",
        "REGMIRROR_STORAGE_S3_SECRET_ACCESS_KEY",
        "REGMIRROR_CLUSTER_REDIS",
        "REGMIRROR_CLUSTER_SECRET",
        "REDIS_PASSWORD",
    ]
    .contains(&name)
}

#[test]
fn kubernetes_cluster_manifests_fit_together() {
    let objects = k8s_objects_in(CLUSTER);
    assert_all_listed(CLUSTER, &objects);
    let deploy = k8s_named(&objects, "Deployment", "regmirror");
    let service = k8s_named(&objects, "Service", "regmirror");
    let peers = k8s_named(&objects, "Service", "regmirror-peers");
    let pod = &deploy["spec"]["template"]["spec"];
    let labels = &deploy["spec"]["template"]["metadata"]["labels"];
    let containers = array_at(pod, "/containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];

    let replicas = u64_at(&deploy, "/spec/replicas");
    assert!(replicas >= 2, "several replicas: {replicas}");
    assert_eq!(deploy["spec"]["selector"]["matchLabels"], *labels);
    assert_pod_runs_the_image(pod, c);

    // The configuration: the ConfigMap's file, mounted where the entrypoint reads it.
    let mount_of = |name: &str| {
        let m = array_at(c, "/volumeMounts")
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no mount {name}"));
        str_at(m, "/mountPath").to_owned()
    };
    let volume = |key: &str| {
        array_at(pod, "/volumes")
            .iter()
            .find(|v| v.get(key).is_some())
            .unwrap_or_else(|| panic!("a {key} volume"))
            .clone()
    };
    let config_volume = volume("configMap");
    let config_map = k8s_named(
        &objects,
        "ConfigMap",
        str_at(&config_volume, "/configMap/name"),
    );
    assert_eq!(
        format!("{}/mirror.toml", mount_of(str_at(&config_volume, "/name"))),
        CONFIG
    );
    let text = str_at(&config_map, "/data/mirror.toml");
    // Alone, the file holds no secret: those are the Secret's.
    let bare = load_config(text, &[]);
    assert!(
        bare.cluster.redis.is_none()
            && bare.cluster.secret.is_none()
            && bare.storage.s3.access_key_id.is_none()
            && bare.storage.s3.secret_access_key.is_none(),
        "the ConfigMap carries no secrets"
    );

    // The environment: the pod's IP as the advertised URL, secrets from the Secret only.
    let (env, from_secret) = k8s_pod_env(c, &objects);
    for e in array_at(c, "/env") {
        let name = str_at(e, "/name");
        assert!(
            !is_secret_var(name) || e.pointer("/valueFrom/secretKeyRef").is_some(),
            "{name}: a secret, from a secretKeyRef only"
        );
    }
    let config = load_config(text, &env);
    assert_eq!(config.storage.backend, regmirror::config::Backend::S3);
    assert!(config.cluster.enabled(), "cluster.redis is set");
    for var in [
        "REGMIRROR_CLUSTER_REDIS",
        "REGMIRROR_CLUSTER_SECRET",
        "REGMIRROR_STORAGE_S3_ACCESS_KEY_ID",
        "REGMIRROR_STORAGE_S3_SECRET_ACCESS_KEY",
    ] {
        assert!(
            from_secret.iter().any(|v| v == var),
            "{var} from the Secret"
        );
    }
    let advertise = config.cluster.advertise.clone().expect("cluster.advertise");
    assert_eq!(
        advertise.as_str(),
        format!("http://{POD_IP}:{}/", config.listen.port()),
        "every replica advertises its own pod IP and the port it listens on"
    );
    let advertise_var = array_at(c, "/env")
        .iter()
        .find(|e| e["name"] == "REGMIRROR_CLUSTER_ADVERTISE")
        .expect("REGMIRROR_CLUSTER_ADVERTISE");
    assert!(
        str_at(advertise_var, "/value").contains("$("),
        "from the downward API, not one address for all"
    );

    // The local tier: an emptyDir at the data dir, its budget below the volume's limit.
    let cache = volume("emptyDir");
    assert_eq!(mount_of(str_at(&cache, "/name")), DATA_DIR);
    assert_eq!(config.data_dir, Path::new(DATA_DIR));
    let limit = quantity(str_at(&cache, "/emptyDir/sizeLimit"));
    assert!(
        config.cache.max_size.0 < limit,
        "cache.max_size must stay below the emptyDir's sizeLimit ({limit} bytes)"
    );

    // Clients reach any replica; the headless Service lists them all.
    assert_probes_and_service_reach(c, &service, config.listen.port());
    assert!(selects(&service["spec"]["selector"], labels));
    assert_eq!(peers["spec"]["clusterIP"], "None", "headless");
    assert!(selects(&peers["spec"]["selector"], labels));
    assert_eq!(
        container_port(c, &array_at(&peers, "/spec/ports")[0]["targetPort"]),
        u64::from(advertise.port().unwrap())
    );
    let pdb = k8s_named(&objects, "PodDisruptionBudget", "regmirror");
    assert!(selects(&pdb["spec"]["selector"], labels));
    let min_available = pdb["spec"]["minAvailable"]
        .as_u64()
        .unwrap_or_else(|| replicas - u64_at(&pdb, "/spec/maxUnavailable"));
    assert!(
        min_available >= 1 && min_available < replicas,
        "a drain can proceed"
    );

    // The bundled Redis: the URL names its Service, port and the password it requires.
    let redis = k8s_named(&objects, "Deployment", "regmirror-redis");
    let redis_labels = &redis["spec"]["template"]["metadata"]["labels"];
    assert!(!selects(&service["spec"]["selector"], redis_labels));
    assert!(!selects(&redis["spec"]["selector"], labels));
    let url = url::Url::parse(config.cluster.redis.as_ref().unwrap().expose()).unwrap();
    let redis_service = k8s_named(&objects, "Service", url.host_str().unwrap());
    assert!(selects(&redis_service["spec"]["selector"], redis_labels));
    let rc = &array_at(&redis, "/spec/template/spec/containers")[0];
    let redis_port = &array_at(&redis_service, "/spec/ports")[0];
    assert_eq!(url.port(), Some(u64_at(redis_port, "/port") as u16));
    assert_eq!(container_port(rc, &redis_port["targetPort"]), 6379);
    let (redis_env, _) = k8s_pod_env(rc, &objects);
    let args: Vec<String> = array_at(rc, "/args")
        .iter()
        .map(|a| {
            redis_env
                .iter()
                .fold(a.as_str().unwrap().to_owned(), |a, (k, v)| {
                    a.replace(&format!("$({k})"), v)
                })
        })
        .collect();
    let password = args
        .windows(2)
        .find(|w| w[0] == "--requirepass")
        .map(|w| w[1].clone())
        .expect("Redis requires a password");
    assert_eq!(
        url.password(),
        Some(password.as_str()),
        "the URL's password is Redis'"
    );
    for e in array_at(rc, "/env") {
        assert!(
            e.pointer("/valueFrom/secretKeyRef").is_some(),
            "Redis' password from the Secret"
        );
    }
    assert_eq!(rc["securityContext"]["readOnlyRootFilesystem"], true);
}

#[test]
fn kubernetes_cluster_config_takes_an_in_cluster_bucket_with_allow_http() {
    // As the ConfigMap's comment says: an in-cluster Garage or MinIO without TLS is refused
    // unless its commented `allow_http = true` is set, and is then warned about.
    let objects = k8s_objects_in(CLUSTER);
    let config_map = k8s_named(&objects, "ConfigMap", "regmirror-cluster-config");
    let text = str_at(&config_map, "/data/mirror.toml");
    let https = "endpoint = \"https://s3.example.com\"";
    assert!(text.contains(https), "the https placeholder");
    assert!(load_config(text, &[]).storage.warnings().is_empty());
    let http = text.replace(https, "endpoint = \"http://garage.regmirror.svc:3900\"");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mirror.toml");
    std::fs::write(&file, &http).unwrap();
    let err = regmirror::config::load(Some(&file), Vec::new(), &Default::default())
        .expect_err("plain HTTP in the cluster without allow_http")
        .to_string();
    assert!(err.contains("allow_http"), "{err}");
    let allowed = http.replace("\n# allow_http = true\n", "\nallow_http = true\n");
    assert_ne!(
        allowed, http,
        "the ConfigMap shows allow_http = true, commented out"
    );
    let config = load_config(&allowed, &[]);
    assert!(config.storage.s3.allow_http);
    assert_eq!(config.storage.warnings().len(), 1, "warned about at start");
}

#[test]
fn kubernetes_cluster_manifests_pass_schema_and_kustomize() {
    assert_schema_and_kustomize(CLUSTER);
}
