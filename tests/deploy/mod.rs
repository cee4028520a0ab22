//! The deployment files in `deploy/` (issue 8) agree with the proxy's own config.
//!
//! No cluster, container engine or running systemd exists here, so these tests read the
//! files: every manifest parses; the ConfigMap's and the systemd unit's `proxy.toml` pass the
//! real binary's `check` with throw-away keys (and the ConfigMap's config serves `/healthz`
//! and `/readyz` on the real binary); probe ports and paths, Service, NetworkPolicy and
//! Dockerfile ports match the config's listeners; security contexts and unit hardening are
//! present. External tools (`kubectl kustomize`, `systemd-analyze`, `logrotate`) are used
//! where they run, and skipped with a printed reason where they do not.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize as _;
use serde_norway::Value as Yaml;

use apple_standin::oidc::OidcIssuer;

use crate::support::{bin, free_port, sha_hex, write_private, TestKey};

/// Where the Kubernetes manifests mount the config and the keys (and the image's CMD reads).
const CONFIG_PATH: &str = "/etc/apple-api-proxy/proxy.toml";
const KEYS_DIR: &str = "/etc/apple-api-proxy/keys";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn k8s_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

fn systemd_dir() -> PathBuf {
    repo().join("deploy/systemd")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// YAML and the manifests.

/// Every document in a YAML file (a comment-only document is `Null`).
fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            Yaml::deserialize(doc).unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()))
        })
        .collect()
}

/// `v.a.b.c` for a dotted path; `Null` when any step is missing.
fn at<'a>(v: &'a Yaml, path: &str) -> &'a Yaml {
    static NULL: Yaml = Yaml::Null;
    path.split('.')
        .try_fold(v, |v, step| v.get(step))
        .unwrap_or(&NULL)
}

fn s<'a>(v: &'a Yaml, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{path}` is not a string in {v:?}"))
}

fn u(v: &Yaml, path: &str) -> u64 {
    at(v, path)
        .as_u64()
        .unwrap_or_else(|| panic!("`{path}` is not a number in {v:?}"))
}

fn seq<'a>(v: &'a Yaml, path: &str) -> &'a [Yaml] {
    at(v, path).as_sequence().map_or(&[], |s| s.as_slice())
}

fn kustomization() -> Yaml {
    let docs = yaml_docs(&k8s_dir().join("kustomization.yaml"));
    assert_eq!(docs.len(), 1, "kustomization.yaml holds one document");
    docs.into_iter().next().unwrap()
}

fn strings(v: &[Yaml]) -> Vec<String> {
    v.iter()
        .map(|x| x.as_str().expect("a list of strings").to_string())
        .collect()
}

/// The objects the kustomization applies, by kind (each kind appears once).
fn manifests() -> BTreeMap<String, Yaml> {
    let mut out = BTreeMap::new();
    for file in strings(seq(&kustomization(), "resources")) {
        for doc in yaml_docs(&k8s_dir().join(&file)) {
            if doc.is_null() {
                continue;
            }
            let kind = s(&doc, "kind").to_string();
            assert!(
                out.insert(kind.clone(), doc).is_none(),
                "{kind} appears twice"
            );
        }
    }
    out
}

/// The configMapGenerator's name and its one `proxy.toml` source file.
fn config_generator() -> (String, PathBuf) {
    let k = kustomization();
    let generators = seq(&k, "configMapGenerator");
    assert_eq!(generators.len(), 1, "one generated ConfigMap (proxy.toml)");
    let files = strings(seq(&generators[0], "files"));
    assert_eq!(files.len(), 1, "the ConfigMap holds proxy.toml only");
    let (key, file) = files[0]
        .split_once('=')
        .unwrap_or(("proxy.toml", &files[0]));
    assert_eq!(key, "proxy.toml", "the ConfigMap key is proxy.toml");
    (s(&generators[0], "name").to_string(), k8s_dir().join(file))
}

fn configmap_toml() -> String {
    read(&config_generator().1)
}

fn pod_spec(m: &BTreeMap<String, Yaml>) -> &Yaml {
    at(&m["Deployment"], "spec.template.spec")
}

fn container(m: &BTreeMap<String, Yaml>) -> &Yaml {
    let containers = seq(pod_spec(m), "containers");
    assert_eq!(containers.len(), 1, "one container: the proxy");
    &containers[0]
}

/// A container port by number or by name.
fn resolve_port(container: &Yaml, port: &Yaml) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = port.as_str().expect("a port number or name");
    seq(container, "ports")
        .iter()
        .find(|p| s(p, "name") == name)
        .map(|p| u(p, "containerPort"))
        .unwrap_or_else(|| panic!("no container port named `{name}`"))
}

fn pod_labels(m: &BTreeMap<String, Yaml>) -> &Yaml {
    at(&m["Deployment"], "spec.template.metadata.labels")
}

/// Every `matchLabels` entry is among the pod's labels.
fn selects_the_pods(selector: &Yaml, m: &BTreeMap<String, Yaml>, what: &str) {
    labels_match(at(selector, "matchLabels"), m, what);
}

/// Every label in `wanted` is among the pod's labels, and there is at least one.
fn labels_match(wanted: &Yaml, m: &BTreeMap<String, Yaml>, what: &str) {
    let wanted = wanted
        .as_mapping()
        .unwrap_or_else(|| panic!("{what}: no labels to select the pods by"));
    assert!(
        !wanted.is_empty(),
        "{what}: an empty selector selects everything"
    );
    for (k, v) in wanted {
        assert_eq!(
            pod_labels(m).get(k),
            Some(v),
            "{what}: selector {k:?} does not match the pod's labels"
        );
    }
}

// ---------------------------------------------------------------------------------------
// proxy.toml.

fn toml_table(text: &str) -> toml::Table {
    text.parse().expect("proxy.toml is TOML")
}

/// `[server] listen` / `admin_listen` as socket addresses.
fn listeners(config: &toml::Table) -> (SocketAddr, SocketAddr) {
    let server = config["server"].as_table().expect("[server]");
    let addr = |f: &str| -> SocketAddr {
        server[f]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("[server] {f} is an address"))
    };
    (addr("listen"), addr("admin_listen"))
}

fn key_files(config: &toml::Table) -> Vec<String> {
    config["keys"]
        .as_array()
        .expect("[[keys]]")
        .iter()
        .map(|k| k["private_key_file"].as_str().unwrap().to_string())
        .collect()
}

fn file_name(path: &str) -> String {
    path.rsplit('/').next().unwrap().to_string()
}

/// A copy of `config` fit for `check` here: key paths through `key_path` (file name → path)
/// with a fresh P-256 key written there (0600), placeholder secret hashes replaced by the
/// hash of a made-up secret (clients with an identity have none), and each identity
/// provider's keys fetched from `issuer` on 127.0.0.1 (its `issuer` string, audience and
/// token age as committed; `jwks_url` and `ca_file` redirected).
fn with_test_keys(
    config: &toml::Table,
    dir: &Path,
    issuer: Option<&LocalIssuer>,
    key_path: impl Fn(&str) -> String,
) -> String {
    let mut config = config.clone();
    for key in config["keys"].as_array_mut().unwrap() {
        let path = key["private_key_file"].as_str().unwrap().to_string();
        write_private(
            &dir.join(file_name(&path)),
            &TestKey::generate().unwrap().pem,
        );
        key["private_key_file"] = toml::Value::String(key_path(&path));
    }
    for client in config["clients"].as_array_mut().unwrap() {
        if client.get("identity").is_some() {
            assert!(client.get("secret_sha256").is_none());
            continue;
        }
        let name = client["name"].as_str().unwrap().to_string();
        let hash = client["secret_sha256"].as_str().unwrap_or("");
        if !(hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())) {
            assert!(
                hash.to_ascii_lowercase().contains("replace"),
                "client {name}: secret_sha256 {hash:?} is neither a hash nor a placeholder saying replace"
            );
            client["secret_sha256"] = toml::Value::String(sha_hex(&format!("aap_test_{name}")));
        }
    }
    if let Some(providers) = config
        .get_mut("identity_providers")
        .and_then(toml::Value::as_array_mut)
    {
        let issuer = issuer.expect("identity providers need a local issuer to fetch keys from");
        let ca = dir.join("issuer-ca.pem");
        std::fs::write(&ca, issuer.issuer.ca_pem()).unwrap();
        for p in providers {
            p["jwks_url"] = toml::Value::String(issuer.issuer.jwks_url());
            p["ca_file"] = toml::Value::String(ca.display().to_string());
        }
    }
    toml::to_string(&config).unwrap()
}

/// The stand-in's OIDC issuer on its own runtime, for the synchronous tests here.
struct LocalIssuer {
    issuer: OidcIssuer,
    _runtime: tokio::runtime::Runtime,
}

impl LocalIssuer {
    fn start() -> LocalIssuer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let issuer = runtime.block_on(OidcIssuer::start()).unwrap();
        LocalIssuer {
            issuer,
            _runtime: runtime,
        }
    }
}

fn run_check(config: &Path, env: &[(&str, &Path)]) -> Output {
    let mut cmd = bin();
    cmd.args(["check", "--config"])
        .arg(config)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn assert_check_passes(out: &Output, what: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what}: `check` failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains(": OK"), "{what}: {stdout}");
    assert!(
        !stdout.contains("FAILED"),
        "{what}: a key failed its test-sign\n{stdout}"
    );
    assert!(!stdout.contains("WARNINGS"), "{what}: warnings\n{stdout}");
}

// ---------------------------------------------------------------------------------------
// Kubernetes.

#[test]
fn every_manifest_parses_and_the_kustomization_lists_exactly_the_files_present() {
    let dir = k8s_dir();
    let mut present = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        // The example caller has its own kustomization (the_example_caller_…).
        if entry.file_type().unwrap().is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") || name.ends_with(".yml") {
            for doc in yaml_docs(&dir.join(&name)) {
                if doc.is_null() || name == "kustomization.yaml" {
                    continue;
                }
                for field in ["apiVersion", "kind", "metadata.name"] {
                    assert!(at(&doc, field).as_str().is_some(), "{name}: no {field}");
                }
            }
        }
        present.insert(name);
    }

    let k = kustomization();
    assert_eq!(s(&k, "kind"), "Kustomization");
    let resources = strings(seq(&k, "resources"));
    let (_, generated_from) = config_generator();
    let mut listed: BTreeSet<String> = resources.iter().cloned().collect();
    assert_eq!(listed.len(), resources.len(), "a resource listed twice");
    listed.insert(
        generated_from
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned(),
    );
    listed.insert("kustomization.yaml".to_string());
    // Documentation only, never applied (it would replace the real Secret with nothing).
    let examples: BTreeSet<String> = present
        .iter()
        .filter(|n| n.ends_with(".example.yaml"))
        .cloned()
        .collect();
    assert!(
        examples.iter().all(|e| !listed.contains(e)),
        "an example is applied"
    );
    listed.extend(examples);
    assert_eq!(
        listed, present,
        "kustomization.yaml (resources + configMapGenerator) vs the files in deploy/kubernetes"
    );

    let kinds: BTreeSet<String> = manifests().into_keys().collect();
    let expected: BTreeSet<String> = [
        "Namespace",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    ]
    .map(String::from)
    .into();
    assert_eq!(kinds, expected);
}

#[test]
fn the_secret_is_documented_never_committed() {
    let path = k8s_dir().join("secret.example.yaml");
    assert!(
        yaml_docs(&path).iter().all(Yaml::is_null),
        "secret.example.yaml must hold comments only"
    );
    let text = read(&path);
    assert!(!text.contains("BEGIN"), "no PEM in the repository");
    assert!(text.contains("kubectl -n apple-api-proxy create secret generic apple-api-proxy-keys"));
    let m = manifests();
    let secret = seq(pod_spec(&m), "volumes")
        .iter()
        .find_map(|v| at(v, "secret.secretName").as_str())
        .expect("a Secret volume");
    assert_eq!(secret, "apple-api-proxy-keys");
    // Every key file the ConfigMap names is created by the documented command.
    for path in key_files(&toml_table(&configmap_toml())) {
        let name = file_name(&path);
        assert!(
            text.contains(&format!("--from-file={name}=")),
            "secret.example.yaml does not create {name}"
        );
    }
    // Nothing else in deploy/ holds key material either.
    for entry in walk(&repo().join("deploy")) {
        let name = entry.to_string_lossy();
        assert!(
            !name.ends_with(".p8") && !name.ends_with(".pem"),
            "{name} committed"
        );
        assert!(
            !read(&entry).contains("PRIVATE KEY-----"),
            "{name} holds a key"
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn the_configmap_config_passes_the_real_check_with_test_keys() {
    let text = configmap_toml();
    let config = toml_table(&text);
    let mut keys = key_files(&config);
    assert!(!keys.is_empty());
    for path in &keys {
        assert!(
            path.starts_with(&format!("{KEYS_DIR}/")),
            "{path}: keys live in the Secret mounted at {KEYS_DIR}"
        );
    }
    keys.sort();
    keys.dedup();
    assert_eq!(
        keys.len(),
        key_files(&config).len(),
        "two keys share a file"
    );
    assert_eq!(
        config["audit"]["path"].as_str(),
        Some("-"),
        "audit to stdout for the cluster's log pipeline"
    );

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let copy = dir.join("proxy.toml");
    let issuer = LocalIssuer::start();
    std::fs::write(
        &copy,
        with_test_keys(&config, dir, Some(&issuer), |p| {
            dir.join(file_name(p)).display().to_string()
        }),
    )
    .unwrap();
    let out = run_check(&copy, &[]);
    assert_check_passes(&out, "the ConfigMap's proxy.toml");
    // The cluster's keys were fetched (here from the stand-in, as the proxy would from
    // the API server's JWKS).
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("IDENTITY PROVIDERS") && stdout.contains("keys: key-1"),
        "{stdout}"
    );

    // As committed, the placeholders refuse to start, naming the field and the fix.
    let as_is = dir.join("as-is.toml");
    std::fs::write(&as_is, &text).unwrap();
    let out = run_check(&as_is, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("secret_sha256") && stderr.contains("client-secret"),
        "{stderr}"
    );
}

#[test]
fn the_configmap_config_answers_the_probes_on_the_real_binary() {
    let m = manifests();
    let c = container(&m);
    let config = toml_table(&configmap_toml());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let issuer = LocalIssuer::start();
    let mut table = toml_table(&with_test_keys(&config, dir, Some(&issuer), |p| {
        dir.join(file_name(p)).display().to_string()
    }));
    let (proxy_port, admin_port) = (free_port(), free_port());
    let server = table["server"].as_table_mut().unwrap();
    server.insert("listen".into(), format!("127.0.0.1:{proxy_port}").into());
    server.insert(
        "admin_listen".into(),
        format!("127.0.0.1:{admin_port}").into(),
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();

    let child = Killed(
        bin()
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    for (probe, want) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let probe_path = s(c, &format!("{probe}.httpGet.path"));
        assert_eq!(probe_path, want);
        let deadline = Instant::now() + Duration::from_secs(4);
        let mut last = None;
        while Instant::now() < deadline {
            last = http_get(admin, probe_path);
            if last == Some(200) {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        assert_eq!(
            last,
            Some(200),
            "{probe} GET {probe_path} on the admin listener"
        );
    }
    drop(child);
}

/// Kills the child when dropped, also when an assertion fails first.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The status of `GET path` over HTTP/1.1, or `None` when nothing answers.
fn http_get(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn probes_ports_and_mounts_match_the_config() {
    let m = manifests();
    let c = container(&m);
    let config = toml_table(&configmap_toml());
    let (listen, admin) = listeners(&config);
    assert!(
        listen.ip().is_unspecified() && admin.ip().is_unspecified(),
        "in a pod the listeners must accept on every address (probes and the Service come from outside the pod)"
    );
    let (listen, admin) = (u64::from(listen.port()), u64::from(admin.port()));
    assert_ne!(listen, admin);

    let container_ports: BTreeSet<u64> = seq(c, "ports")
        .iter()
        .map(|p| u(p, "containerPort"))
        .collect();
    assert_eq!(container_ports, BTreeSet::from([listen, admin]));
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(s(c, &format!("{probe}.httpGet.path")), path);
        let port = resolve_port(c, at(c, &format!("{probe}.httpGet.port")));
        assert_eq!(port, admin, "{probe} must probe admin_listen's port");
    }

    // The Service exposes both listeners, by the container's ports.
    let service = &m["Service"];
    labels_match(at(service, "spec.selector"), &m, "Service");
    let targets: BTreeSet<u64> = seq(service, "spec.ports")
        .iter()
        .map(|p| resolve_port(c, at(p, "targetPort")))
        .collect();
    assert_eq!(targets, BTreeSet::from([listen, admin]));
    let ports: BTreeSet<u64> = seq(service, "spec.ports")
        .iter()
        .map(|p| u(p, "port"))
        .collect();
    assert_eq!(ports, BTreeSet::from([8080, 9090]));

    // The config and the keys are mounted where the container's arguments and the config
    // expect them.
    let args = strings(seq(c, "args"));
    assert_eq!(args, ["serve", "--config", CONFIG_PATH]);
    let (cm_name, _) = config_generator();
    let volumes = seq(pod_spec(&m), "volumes");
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| s(v, "name") == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    let mounts = seq(c, "volumeMounts");
    let config_mount = mounts
        .iter()
        .find(|v| s(v, "mountPath") == CONFIG_PATH)
        .expect("proxy.toml mounted at /etc/apple-api-proxy/proxy.toml");
    assert_eq!(s(config_mount, "subPath"), "proxy.toml");
    assert_eq!(at(config_mount, "readOnly").as_bool(), Some(true));
    assert_eq!(
        s(volume(s(config_mount, "name")), "configMap.name"),
        cm_name
    );

    let keys_mount = mounts
        .iter()
        .find(|v| s(v, "mountPath") == KEYS_DIR)
        .expect("keys mounted at /etc/apple-api-proxy/keys");
    assert_eq!(at(keys_mount, "readOnly").as_bool(), Some(true));
    let keys = volume(s(keys_mount, "name"));
    assert_eq!(u(keys, "secret.defaultMode"), 0o400, "defaultMode 0400");

    // Nothing to write: with the audit log on stdout no emptyDir is needed.
    assert_eq!(config["audit"]["path"].as_str(), Some("-"));
    assert!(
        volumes.iter().all(|v| at(v, "emptyDir").is_null()),
        "an emptyDir nothing writes to"
    );

    // SIGTERM drains for shutdown_grace; the pod must be given longer (plus preStop).
    let grace = humantime::parse_duration(config["server"]["shutdown_grace"].as_str().unwrap())
        .unwrap()
        .as_secs();
    let pre_stop = at(c, "lifecycle.preStop.sleep.seconds")
        .as_u64()
        .unwrap_or(0);
    assert!(
        u(pod_spec(&m), "terminationGracePeriodSeconds") > grace + pre_stop,
        "terminationGracePeriodSeconds must exceed shutdown_grace + preStop"
    );
}

#[test]
fn the_pods_run_non_root_read_only_without_capabilities() {
    let m = manifests();
    let deployment = &m["Deployment"];
    assert!(u(deployment, "spec.replicas") >= 2);
    selects_the_pods(at(deployment, "spec.selector"), &m, "Deployment");
    let pod = pod_spec(&m);
    let c = container(&m);

    assert_eq!(
        at(pod, "securityContext.runAsNonRoot").as_bool(),
        Some(true)
    );
    assert!(u(pod, "securityContext.runAsUser") > 0);
    assert!(u(pod, "securityContext.runAsGroup") > 0);
    assert_eq!(
        s(pod, "securityContext.seccompProfile.type"),
        "RuntimeDefault"
    );
    assert_eq!(
        at(pod, "automountServiceAccountToken").as_bool(),
        Some(false)
    );
    assert!(at(pod, "hostNetwork").is_null() && at(pod, "hostPID").is_null());

    let sc = at(c, "securityContext");
    assert_eq!(at(sc, "runAsNonRoot").as_bool(), Some(true));
    assert_eq!(at(sc, "allowPrivilegeEscalation").as_bool(), Some(false));
    assert_eq!(at(sc, "readOnlyRootFilesystem").as_bool(), Some(true));
    assert_ne!(at(sc, "privileged").as_bool(), Some(true));
    assert_eq!(strings(seq(sc, "capabilities.drop")), ["ALL"]);
    assert!(seq(sc, "capabilities.add").is_empty());
    assert_eq!(s(sc, "seccompProfile.type"), "RuntimeDefault");
    if let Some(user) = at(sc, "runAsUser").as_u64() {
        assert!(user > 0);
    }

    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                !at(c, &format!("resources.{kind}.{resource}")).is_null(),
                "resources.{kind}.{resource}"
            );
        }
    }

    // Replicas spread over nodes.
    let anti = at(pod, "affinity.podAntiAffinity");
    let terms: Vec<&Yaml> = seq(anti, "preferredDuringSchedulingIgnoredDuringExecution")
        .iter()
        .map(|t| at(t, "podAffinityTerm"))
        .chain(seq(anti, "requiredDuringSchedulingIgnoredDuringExecution"))
        .collect();
    assert!(
        terms
            .iter()
            .any(|t| s(t, "topologyKey") == "kubernetes.io/hostname"),
        "pod anti-affinity by hostname"
    );
    for t in terms {
        selects_the_pods(at(t, "labelSelector"), &m, "podAntiAffinity");
    }
}

#[test]
fn disruption_budget_autoscaler_and_namespace_fit_the_deployment() {
    let m = manifests();
    let pdb = &m["PodDisruptionBudget"];
    assert_eq!(s(pdb, "apiVersion"), "policy/v1");
    assert_eq!(u(pdb, "spec.minAvailable"), 1);
    selects_the_pods(at(pdb, "spec.selector"), &m, "PodDisruptionBudget");

    let hpa = &m["HorizontalPodAutoscaler"];
    assert_eq!(s(hpa, "apiVersion"), "autoscaling/v2");
    assert_eq!(s(hpa, "spec.scaleTargetRef.kind"), "Deployment");
    assert_eq!(
        s(hpa, "spec.scaleTargetRef.name"),
        s(&m["Deployment"], "metadata.name")
    );
    assert!(u(hpa, "spec.minReplicas") >= 2);
    assert!(u(hpa, "spec.maxReplicas") >= u(hpa, "spec.minReplicas"));
    assert!(seq(hpa, "spec.metrics")
        .iter()
        .any(|metric| s(metric, "type") == "Resource" && s(metric, "resource.name") == "cpu"));

    // The kustomization puts everything in the namespace it creates, and that namespace
    // enforces the restricted Pod Security profile.
    let ns = &m["Namespace"];
    assert_eq!(s(&kustomization(), "namespace"), s(ns, "metadata.name"));
    let labels = at(ns, "metadata.labels");
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .and_then(Yaml::as_str),
        Some("restricted")
    );
}

#[test]
fn the_network_policy_admits_labelled_clients_and_only_https_and_dns_out() {
    let m = manifests();
    let np = &m["NetworkPolicy"];
    selects_the_pods(at(np, "spec.podSelector"), &m, "NetworkPolicy");
    let types = strings(seq(np, "spec.policyTypes"));
    assert!(types.contains(&"Ingress".to_string()) && types.contains(&"Egress".to_string()));
    let (listen, admin) = listeners(&toml_table(&configmap_toml()));

    // Egress: every rule is limited by port, to TCP 443 or DNS.
    let mut egress = BTreeSet::new();
    for rule in seq(np, "spec.egress") {
        let ports = seq(rule, "ports");
        assert!(
            !ports.is_empty(),
            "an egress rule without ports allows everything"
        );
        for p in ports {
            let proto = at(p, "protocol").as_str().unwrap_or("TCP").to_string();
            let port = u(p, "port");
            assert!(
                (proto == "TCP" && port == 443) || port == 53,
                "egress to {proto}/{port}"
            );
            assert!(at(p, "endPort").is_null(), "a port range");
            egress.insert((proto, port));
        }
    }
    assert!(egress.contains(&("TCP".to_string(), 443)));
    assert!(egress.contains(&("UDP".to_string(), 53)));

    // Ingress: the proxy port from labelled client namespaces, the admin port from monitoring.
    let mut ingress = BTreeMap::new();
    for rule in seq(np, "spec.ingress") {
        let from = seq(rule, "from");
        assert!(
            !from.is_empty(),
            "an ingress rule without `from` admits everyone"
        );
        let ports = seq(rule, "ports");
        assert_eq!(ports.len(), 1, "one port per ingress rule");
        let selectors: Vec<&Yaml> = from
            .iter()
            .map(|f| at(f, "namespaceSelector.matchLabels"))
            .collect();
        assert!(selectors
            .iter()
            .all(|s| s.as_mapping().is_some_and(|m| !m.is_empty())));
        ingress.insert(u(&ports[0], "port"), selectors);
    }
    assert_eq!(
        ingress.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([u64::from(listen.port()), u64::from(admin.port())])
    );
    assert_eq!(
        ingress[&u64::from(listen.port())][0]
            .get("apple-api-proxy/client")
            .and_then(Yaml::as_str),
        Some("true")
    );
    assert_eq!(
        ingress[&u64::from(admin.port())][0]
            .get("kubernetes.io/metadata.name")
            .and_then(Yaml::as_str),
        Some("monitoring")
    );
}

#[test]
fn kustomize_renders_and_a_config_change_renames_the_configmap() {
    let render = |dir: &Path| -> Result<Vec<Yaml>, String> {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(dir)
            .output()
            .map_err(|e| format!("kubectl cannot run: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "kubectl kustomize failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let text = String::from_utf8(out.stdout).unwrap();
        Ok(serde_norway::Deserializer::from_str(&text)
            .map(|d| Yaml::deserialize(d).expect("kustomize output is YAML"))
            .collect())
    };
    let first = match render(&k8s_dir()) {
        Ok(docs) => docs,
        Err(e) if e.starts_with("kubectl cannot run") => {
            eprintln!("SKIPPED kustomize rendering: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let (cm_base, cm_file) = config_generator();
    let configmap_name = |docs: &[Yaml]| -> String {
        let cm = docs
            .iter()
            .find(|d| s(d, "kind") == "ConfigMap")
            .expect("a generated ConfigMap");
        let name = s(cm, "metadata.name").to_string();
        assert!(
            name.starts_with(&format!("{cm_base}-")),
            "{name}: no content hash"
        );
        let deployment = docs.iter().find(|d| s(d, "kind") == "Deployment").unwrap();
        assert!(
            seq(deployment, "spec.template.spec.volumes")
                .iter()
                .any(|v| at(v, "configMap.name").as_str() == Some(&name)),
            "the Deployment does not mount {name}"
        );
        name
    };
    let before = configmap_name(&first);
    let cm = first.iter().find(|d| s(d, "kind") == "ConfigMap").unwrap();
    assert_eq!(
        at(cm, "data").get("proxy.toml").and_then(Yaml::as_str),
        Some(read(&cm_file).as_str())
    );
    let namespace = s(&kustomization(), "namespace").to_string();
    for doc in &first {
        if s(doc, "kind") != "Namespace" {
            assert_eq!(s(doc, "metadata.namespace"), namespace, "{doc:?}");
        }
    }

    // Edit the config in a copy: the ConfigMap's name changes, so the pods roll.
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(k8s_dir()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            continue;
        }
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    let copy = tmp.path().join(cm_file.file_name().unwrap());
    let mut text = read(&copy);
    text.push_str("\n# changed\n");
    std::fs::write(&copy, text).unwrap();
    let after = configmap_name(&render(tmp.path()).unwrap());
    assert_ne!(before, after, "a config change must rename the ConfigMap");

    // The example caller renders into its own namespace (the binding is cluster-wide).
    let caller = render(&caller_dir()).unwrap();
    assert_eq!(caller.len(), 4);
    for doc in &caller {
        match s(doc, "kind") {
            "Namespace" | "ClusterRoleBinding" => assert!(at(doc, "metadata.namespace").is_null()),
            _ => assert_eq!(s(doc, "metadata.namespace"), "inventory", "{doc:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// systemd.

/// `Key=value` lines of a unit file, in order (comments and sections skipped).
fn unit_directives(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with('#') && !l.starts_with(';') && !l.starts_with('[')
        })
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not Key=value: {l}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

fn unit_text() -> String {
    read(&systemd_dir().join("apple-api-proxy.service"))
}

fn values<'a>(directives: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    directives
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn the_systemd_unit_has_its_hardening_directives() {
    let d = unit_directives(&unit_text());
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("CapabilityBoundingSet", ""),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallFilter", "@system-service"),
        ("StateDirectory", "apple-api-proxy"),
        ("LogsDirectory", "apple-api-proxy"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Restart", "on-failure"),
    ] {
        assert!(
            values(&d, key).contains(&value),
            "{key}={value} missing (has {:?})",
            values(&d, key)
        );
    }
    assert!(
        values(&d, "User").is_empty(),
        "DynamicUser, not a fixed user"
    );
    let start = values(&d, "ExecStart");
    let pre = values(&d, "ExecStartPre");
    assert_eq!(start.len(), 1);
    assert_eq!(pre.len(), 1);
    assert!(
        start[0].ends_with(&format!(" serve --config {CONFIG_PATH}")),
        "{}",
        start[0]
    );
    assert!(
        pre[0].ends_with(&format!(" check --config {CONFIG_PATH}")),
        "{}",
        pre[0]
    );
    assert_eq!(
        start[0].split_whitespace().next(),
        pre[0].split_whitespace().next(),
        "check and serve run the same binary"
    );

    // Keys come in through LoadCredential=, one per [[keys]] entry of the config it reads,
    // which names them under ${CREDENTIALS_DIRECTORY}.
    let creds: BTreeSet<String> = values(&d, "LoadCredential")
        .iter()
        .map(|v| {
            let (name, source) = v.split_once(':').expect("LoadCredential=NAME:PATH");
            assert!(source.starts_with(&format!("{KEYS_DIR}/")), "{source}");
            assert_eq!(file_name(source), name);
            name.to_string()
        })
        .collect();
    let config = toml_table(&read(&systemd_dir().join("proxy.toml")));
    let wanted: BTreeSet<String> = key_files(&config)
        .iter()
        .map(|p| {
            p.strip_prefix("${CREDENTIALS_DIRECTORY}/")
                .unwrap_or_else(|| panic!("{p}: not under ${{CREDENTIALS_DIRECTORY}}"))
                .to_string()
        })
        .collect();
    assert_eq!(
        creds, wanted,
        "LoadCredential= lines vs the config's key files"
    );

    // The audit log goes to the LogsDirectory; stopping waits longer than the drain.
    let audit = config["audit"]["path"].as_str().unwrap();
    assert_eq!(
        Path::new(audit).parent(),
        Some(Path::new("/var/log/apple-api-proxy"))
    );
    let grace =
        humantime::parse_duration(config["server"]["shutdown_grace"].as_str().unwrap()).unwrap();
    let stop = humantime::parse_duration(values(&d, "TimeoutStopSec")[0]).unwrap();
    assert!(stop > grace, "TimeoutStopSec must exceed shutdown_grace");
}

#[test]
fn the_systemd_config_passes_the_real_check_with_credentials_directory() {
    let config = toml_table(&read(&systemd_dir().join("proxy.toml")));
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    // Key paths stay "${CREDENTIALS_DIRECTORY}/…": the proxy expands them.
    let text = with_test_keys(&config, &creds, None, str::to_string);
    assert!(text.contains("${CREDENTIALS_DIRECTORY}/"));
    let copy = tmp.path().join("proxy.toml");
    std::fs::write(&copy, &text).unwrap();
    assert_check_passes(
        &run_check(&copy, &[("CREDENTIALS_DIRECTORY", &creds)]),
        "deploy/systemd/proxy.toml",
    );

    // Outside systemd the variable is unset, and the error says so.
    let out = run_check(&copy, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CREDENTIALS_DIRECTORY"));
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    // The unit with the real binary in place of /usr/local/bin/apple-api-proxy, since verify
    // checks that the commands exist.
    let tmp = tempfile::tempdir().unwrap();
    let unit = tmp.path().join("apple-api-proxy.service");
    std::fs::write(
        &unit,
        unit_text().replace(
            "/usr/local/bin/apple-api-proxy",
            env!("CARGO_BIN_EXE_apple-api-proxy"),
        ),
    )
    .unwrap();
    let out = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .current_dir(tmp.path())
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIPPED systemd-analyze verify: cannot run systemd-analyze: {e}");
            return;
        }
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Problems with the unit name it (file:line, or the unit name); anything else is the
    // environment (e.g. no systemd running), which says nothing about the unit.
    let about_unit: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("apple-api-proxy"))
        .collect();
    assert!(
        about_unit.is_empty(),
        "systemd-analyze verify found problems:\n{said}"
    );
    if !out.status.success() {
        eprintln!(
            "SKIPPED systemd-analyze verify: it cannot run meaningfully here ({}): {said}",
            out.status
        );
        return;
    }
    eprintln!(
        "systemd-analyze verify: OK{}",
        if said.trim().is_empty() {
            String::new()
        } else {
            format!(" ({})", said.trim())
        }
    );

    // The offline security review (systemd ≥ 250), where available: exposure stays low.
    let Ok(out) = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .current_dir(tmp.path())
        .output()
    else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    match text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for apple-api-proxy.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse::<f64>().ok())
    {
        Some(exposure) => {
            eprintln!("systemd-analyze security: exposure {exposure}");
            assert!(exposure <= 2.0, "exposure {exposure}:\n{text}");
        }
        None => eprintln!(
            "SKIPPED systemd-analyze security --offline: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

#[test]
fn logrotate_rotates_the_audit_log_and_reloads_the_service() {
    let text = read(&systemd_dir().join("apple-api-proxy.logrotate"));
    let config = toml_table(&read(&systemd_dir().join("proxy.toml")));
    let audit = config["audit"]["path"].as_str().unwrap();
    assert!(
        text.contains(&format!("{audit} {{")),
        "logrotate names {audit}"
    );
    assert!(text.contains("systemctl reload apple-api-proxy"));
    assert!(
        text.contains("delaycompress"),
        "the proxy writes to the moved file until SIGHUP"
    );

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let log = dir.join("audit.jsonl");
    std::fs::write(&log, "{}\n").unwrap();
    let conf = dir.join("logrotate.conf");
    std::fs::write(
        &conf,
        text.replace(audit, &log.display().to_string()).replace(
            "systemctl reload apple-api-proxy",
            &format!("touch {}", dir.join("reloaded").display()),
        ),
    )
    .unwrap();
    let out = match Command::new("logrotate")
        .arg("--force")
        .arg("--state")
        .arg(dir.join("state"))
        .arg(&conf)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIPPED running logrotate: {e}");
            return;
        }
    };
    assert!(
        out.status.success(),
        "logrotate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("audit.jsonl.1").exists(), "rotated");
    assert!(
        !log.exists(),
        "nocreate: the proxy creates the new file on SIGHUP"
    );
    assert!(dir.join("reloaded").exists(), "postrotate ran");
}

// ---------------------------------------------------------------------------------------
// Dockerfile.

/// Instructions of a Dockerfile: (INSTRUCTION, arguments), continuations joined.
fn dockerfile() -> Vec<(String, String)> {
    let text = read(&repo().join("deploy/Dockerfile"));
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                let (i, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((i.to_ascii_uppercase(), args.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

#[test]
fn the_dockerfile_builds_locked_runs_non_root_and_bakes_nothing_in() {
    let steps = dockerfile();
    let stages: Vec<usize> = steps
        .iter()
        .enumerate()
        .filter(|(_, (i, _))| i == "FROM")
        .map(|(n, _)| n)
        .collect();
    assert!(stages.len() >= 2, "multi-stage");
    let (build, last) = (
        &steps[stages[0]..*stages.last().unwrap()],
        &steps[*stages.last().unwrap()..],
    );

    // The builder: Rust no older than the crate's rust-version, on Debian 12 like the final
    // image (the binary links the builder's glibc).
    let arg = |name: &str| {
        steps
            .iter()
            .find_map(|(i, a)| (i == "ARG").then(|| a.strip_prefix(&format!("{name}=")))?)
            .unwrap_or_else(|| panic!("ARG {name}"))
    };
    let from = &build[0].1;
    assert!(
        from.starts_with("rust:${RUST_VERSION}-slim-bookworm"),
        "{from}"
    );
    let manifest: toml::Table = read(&repo().join("Cargo.toml")).parse().unwrap();
    let version = |v: &str| -> Vec<u64> { v.split('.').map(|n| n.parse().unwrap()).collect() };
    let msrv = manifest["package"]["rust-version"].as_str().unwrap();
    assert!(
        version(arg("RUST_VERSION")) >= version(msrv),
        "RUST_VERSION {} is older than rust-version {msrv}",
        arg("RUST_VERSION")
    );
    assert!(build
        .iter()
        .any(|(i, a)| i == "RUN" && a.contains("cargo build --release --locked")));

    // The final stage: distroless Debian 12, non-root, the binary and nothing else.
    let base = &last[0].1;
    assert!(base.starts_with("gcr.io/distroless/cc-debian12"), "{base}");
    let user = last
        .iter()
        .rev()
        .find_map(|(i, a)| (i == "USER").then_some(a.as_str()))
        .unwrap_or(if base.ends_with(":nonroot") {
            "nonroot"
        } else {
            "root"
        });
    let uid = user.split(':').next().unwrap();
    assert!(
        uid == "nonroot" || uid.parse::<u32>().is_ok_and(|n| n > 0),
        "USER {user}"
    );
    for (i, a) in last {
        if i == "COPY" || i == "ADD" {
            assert_eq!(i, "COPY", "ADD in the final stage");
            assert!(
                a.starts_with("--from="),
                "the final stage copies from the host: {a}"
            );
            assert_eq!(a.split_whitespace().count(), 3, "one file: {a}");
            assert!(a.ends_with(" /apple-api-proxy"), "{a}");
        }
        for baked in [".p8", "proxy.toml", "keys"] {
            assert!(
                !((i == "COPY" || i == "ADD") && a.contains(baked)),
                "{baked} baked into the image: {i} {a}"
            );
        }
        assert_ne!(
            i, "VOLUME",
            "config and keys are mounted by the runtime, not declared"
        );
    }
    let one = |name: &str| -> &str {
        let found: Vec<&str> = last
            .iter()
            .filter(|(i, _)| i == name)
            .map(|(_, a)| a.as_str())
            .collect();
        assert_eq!(found.len(), 1, "{name}");
        found[0]
    };
    assert_eq!(one("ENTRYPOINT"), r#"["/apple-api-proxy"]"#);
    assert_eq!(
        one("CMD"),
        format!(r#"["serve", "--config", "{CONFIG_PATH}"]"#)
    );
    let (listen, admin) = listeners(&toml_table(&configmap_toml()));
    let exposed: BTreeSet<u16> = one("EXPOSE")
        .split_whitespace()
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    assert_eq!(exposed, BTreeSet::from([listen.port(), admin.port()]));
}

#[test]
fn the_build_context_holds_the_sources_and_no_keys() {
    let ignore = read(&repo().join("deploy/Dockerfile.dockerignore"));
    let lines: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        lines.first(),
        Some(&"*"),
        "an allow-list: everything is excluded first"
    );
    for never in ["**/*.p8", "**/proxy.toml"] {
        let at = lines
            .iter()
            .position(|l| *l == never)
            .unwrap_or_else(|| panic!("{never}"));
        assert!(
            lines[at..].iter().all(|l| !l.starts_with('!')),
            "{never} is re-included after being excluded"
        );
    }
    // Every file cargo needs to read the manifest and build is let in.
    let manifest: toml::Table = read(&repo().join("Cargo.toml")).parse().unwrap();
    let mut needed = vec![
        "Cargo.toml".to_string(),
        "Cargo.lock".to_string(),
        "src/".to_string(),
    ];
    // The workspace's other members: the stand-in is a dependency of the binary (`demo`).
    for member in manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
        .filter_map(|m| m.as_str())
        .filter(|m| *m != ".")
    {
        needed.push(format!("{}/", member.split('/').next().unwrap()));
    }
    for kind in ["bin", "bench", "test", "example"] {
        let dir = match kind {
            "bin" => "src/",
            "bench" => "benches/",
            "test" => "tests/",
            _ => "examples/",
        };
        for target in manifest
            .get(kind)
            .and_then(|t| t.as_array())
            .into_iter()
            .flatten()
        {
            let path = target.get("path").and_then(|p| p.as_str()).unwrap_or(dir);
            let top = path.split('/').next().unwrap();
            needed.push(if path.contains('/') {
                format!("{top}/")
            } else {
                top.to_string()
            });
        }
    }
    for n in needed {
        assert!(
            lines.contains(&format!("!{n}").as_str()),
            "{n} is not in the build context"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The example caller (deploy/kubernetes/example-caller): workload identity, DESIGN §17.

fn caller_dir() -> PathBuf {
    k8s_dir().join("example-caller")
}

/// The example caller's kustomization and its objects by kind (each kind once).
fn caller_manifests() -> (Yaml, BTreeMap<String, Yaml>) {
    let docs = yaml_docs(&caller_dir().join("kustomization.yaml"));
    assert_eq!(docs.len(), 1);
    let k = docs.into_iter().next().unwrap();
    let mut out = BTreeMap::new();
    for file in strings(seq(&k, "resources")) {
        for doc in yaml_docs(&caller_dir().join(&file)) {
            if doc.is_null() {
                continue;
            }
            let kind = s(&doc, "kind").to_string();
            assert!(out.insert(kind.clone(), doc).is_none(), "{kind} twice");
        }
    }
    (k, out)
}

/// What the example caller's pod presents and asks for, read from its manifests.
struct Caller {
    /// `system:serviceaccount:<namespace>:<service account>`: the token's `sub`.
    sub: String,
    audience: String,
    expiration_seconds: u64,
    /// The request the job makes: its path and query.
    path: String,
}

fn the_caller() -> Caller {
    let (k, m) = caller_manifests();
    let namespace = s(&k, "namespace").to_string();
    let pod = at(&m["CronJob"], "spec.jobTemplate.spec.template.spec");
    let sa = s(pod, "serviceAccountName");
    assert_eq!(sa, s(&m["ServiceAccount"], "metadata.name"));
    let source = seq(pod, "volumes")
        .iter()
        .flat_map(|v| seq(v, "projected.sources"))
        .map(|src| at(src, "serviceAccountToken"))
        .find(|t| !t.is_null())
        .expect("a projected service-account token");
    let containers = seq(pod, "containers");
    assert_eq!(containers.len(), 1);
    let command = strings(seq(&containers[0], "command")).join(" ");
    let (_, url) = command
        .split_once("\"$PROXY_URL")
        .expect("the job calls $PROXY_URL");
    Caller {
        sub: format!("system:serviceaccount:{namespace}:{sa}"),
        audience: s(source, "audience").to_string(),
        expiration_seconds: u(source, "expirationSeconds"),
        path: url.split('"').next().unwrap().to_string(),
    }
}

/// The ConfigMap's identity provider and client for the example caller's token.
fn caller_entries(config: &toml::Table, caller: &Caller) -> (toml::Table, toml::Table) {
    let client = config["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(toml::Value::as_table)
        .find(|c| {
            c.get("identity")
                .and_then(|i| i.get("claims"))
                .and_then(|c| c.get("sub"))
                .and_then(toml::Value::as_str)
                == Some(caller.sub.as_str())
        })
        .unwrap_or_else(|| panic!("no client in proxy.toml claims sub = {}", caller.sub))
        .clone();
    let provider_name = client["identity"]["provider"].as_str().unwrap();
    let provider = config["identity_providers"]
        .as_array()
        .expect("[[identity_providers]]")
        .iter()
        .filter_map(toml::Value::as_table)
        .find(|p| p["name"].as_str() == Some(provider_name))
        .expect("the client's provider")
        .clone();
    (provider, client)
}

#[test]
fn the_example_caller_is_admitted_by_the_proxy_s_policy_and_holds_no_secret() {
    let (k, m) = caller_manifests();
    // Its kustomization lists exactly its files.
    let listed: BTreeSet<String> = strings(seq(&k, "resources"))
        .into_iter()
        .chain(["kustomization.yaml".to_string()])
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(caller_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, present);
    let kinds: BTreeSet<&str> = m.keys().map(String::as_str).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "Namespace",
            "ServiceAccount",
            "CronJob",
            "ClusterRoleBinding"
        ])
    );

    // Its namespace carries the label the proxy's NetworkPolicy admits on the proxy port,
    // and enforces the restricted Pod Security profile.
    let ns = &m["Namespace"];
    assert_eq!(s(&k, "namespace"), s(ns, "metadata.name"));
    let labels = at(ns, "metadata.labels");
    let proxy = manifests();
    let (listen, _) = listeners(&toml_table(&configmap_toml()));
    let admitted = seq(&proxy["NetworkPolicy"], "spec.ingress")
        .iter()
        .filter(|r| u(&seq(r, "ports")[0], "port") == u64::from(listen.port()))
        .flat_map(|r| seq(r, "from"))
        .any(|f| {
            at(f, "namespaceSelector.matchLabels")
                .as_mapping()
                .is_some_and(|want| want.iter().all(|(k, v)| labels.get(k) == Some(v)))
        });
    assert!(
        admitted,
        "the proxy's NetworkPolicy does not admit the caller's namespace"
    );
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .and_then(Yaml::as_str),
        Some("restricted")
    );

    // The job calls the proxy's Service by its cluster name and port.
    let pod = at(&m["CronJob"], "spec.jobTemplate.spec.template.spec");
    let c = &seq(pod, "containers")[0];
    let env: BTreeMap<&str, &str> = seq(c, "env")
        .iter()
        .map(|e| (s(e, "name"), s(e, "value")))
        .collect();
    let service = &proxy["Service"];
    let http_port = seq(service, "spec.ports")
        .iter()
        .find(|p| s(p, "name") == "http")
        .map(|p| u(p, "port"))
        .expect("the Service's http port");
    assert_eq!(
        env["PROXY_URL"],
        format!(
            "http://{}.{}.svc:{http_port}",
            s(service, "metadata.name"),
            s(&kustomization(), "namespace")
        )
    );

    // No secret and no Kubernetes API token: only the projected token, read from where it is
    // mounted, for the proxy's audience, no older than the provider accepts.
    let caller = the_caller();
    let config = toml_table(&configmap_toml());
    let (provider, client) = caller_entries(&config, &caller);
    assert!(client.get("secret_sha256").is_none() && client.get("client_key").is_none());
    assert_eq!(
        at(pod, "automountServiceAccountToken").as_bool(),
        Some(false)
    );
    assert_eq!(
        at(&m["ServiceAccount"], "automountServiceAccountToken").as_bool(),
        Some(false)
    );
    assert!(seq(c, "envFrom").is_empty());
    assert!(seq(pod, "volumes")
        .iter()
        .all(|v| at(v, "secret").is_null()));
    let token_dir = seq(c, "volumeMounts")
        .iter()
        .find(|v| {
            seq(pod, "volumes")
                .iter()
                .any(|vol| s(vol, "name") == s(v, "name") && !at(vol, "projected").is_null())
        })
        .map(|v| s(v, "mountPath"))
        .expect("the projected token is mounted");
    let command = strings(seq(c, "command")).join(" ");
    assert!(
        command.contains(&format!("$(cat {token_dir}/token)")),
        "{command}"
    );
    assert_eq!(caller.audience, provider["audience"].as_str().unwrap());
    let max_age = humantime::parse_duration(provider["max_token_age"].as_str().unwrap())
        .unwrap()
        .as_secs();
    // The kubelet renews a projected token once 80 % of its lifetime has passed.
    assert!(
        caller.expiration_seconds * 8 / 10 <= max_age,
        "a token the kubelet still serves would be older than max_token_age"
    );
    assert!(caller.expiration_seconds >= 600, "Kubernetes' minimum");

    // The pod passes the restricted profile.
    assert_eq!(
        at(pod, "securityContext.runAsNonRoot").as_bool(),
        Some(true)
    );
    let sc = at(c, "securityContext");
    assert_eq!(at(sc, "allowPrivilegeEscalation").as_bool(), Some(false));
    assert_eq!(at(sc, "readOnlyRootFilesystem").as_bool(), Some(true));
    assert_eq!(strings(seq(sc, "capabilities.drop")), ["ALL"]);
    assert_eq!(s(sc, "seccompProfile.type"), "RuntimeDefault");

    // The proxy can fetch the cluster's keys: the JWKS of the API server (readable through
    // the issuer-discovery binding) over TLS with the cluster's CA, mounted from the
    // kube-root-ca.crt ConfigMap where ca_file says.
    assert_eq!(
        provider["jwks_url"].as_str(),
        Some("https://kubernetes.default.svc/openid/v1/jwks")
    );
    let binding = &m["ClusterRoleBinding"];
    assert_eq!(
        s(binding, "roleRef.name"),
        "system:service-account-issuer-discovery"
    );
    let ca_file = provider["ca_file"].as_str().unwrap();
    let (ca_dir, ca_name) = ca_file.rsplit_once('/').unwrap();
    assert_eq!(ca_name, "ca.crt");
    let mount = seq(container(&proxy), "volumeMounts")
        .iter()
        .find(|v| s(v, "mountPath") == ca_dir)
        .expect("the cluster CA is mounted where ca_file points");
    let volume = seq(pod_spec(&proxy), "volumes")
        .iter()
        .find(|v| s(v, "name") == s(mount, "name"))
        .unwrap();
    assert_eq!(s(volume, "configMap.name"), "kube-root-ca.crt");
}

/// The token the kubelet would project into the caller's pod, as the cluster would sign it
/// (RS256, iss the ConfigMap's issuer), through the real binary with the ConfigMap's
/// provider and client: the job's request reaches Apple as client `inventory`; another
/// service account's token, a token for another audience and a write are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_caller_s_projected_token_alone_gets_its_request_through_the_proxy() {
    use crate::second_round::{binary_audit, Binary};
    use crate::support::{send, Setup};
    use http::StatusCode;

    let caller = the_caller();
    let config = toml_table(&configmap_toml());
    let (mut provider, mut client) = caller_entries(&config, &caller);
    let cluster = OidcIssuer::start().await.unwrap();
    cluster.add_rsa_key("cluster-key", true).unwrap();
    let issuer = provider["issuer"].as_str().unwrap().to_string();
    provider.insert("jwks_url".into(), cluster.jwks_url().into());
    provider.insert("ca_file".into(), "cluster-ca.pem".into());
    // The test world's key for App Store Connect stands in for the ConfigMap's `connect`.
    client.remove("key");
    let mut extra = toml::Table::new();
    extra.insert(
        "identity_providers".into(),
        vec![toml::Value::Table(provider)].into(),
    );
    extra.insert("clients".into(), vec![toml::Value::Table(client)].into());
    let extra = toml::to_string(&extra).unwrap();
    let ca = cluster.ca_pem().to_string();
    let b = Binary::start_with(
        Setup::default(),
        move |t| format!("{t}\n{extra}"),
        move |dir| std::fs::write(dir.join("cluster-ca.pem"), ca).unwrap(),
    )
    .await;

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let token = |sub: &str, aud: &str| {
        cluster.sign(
            "cluster-key",
            serde_json::json!({}),
            serde_json::json!({
                "iss": issuer, "aud": [aud], "sub": sub,
                "iat": now - 30, "nbf": now - 30, "exp": now + caller.expiration_seconds as i64 - 30,
                "kubernetes.io": {"namespace": "inventory",
                                  "serviceaccount": {"name": "inventory-job", "uid": "0d4f5c3e-1b7a-4a43-9c55-2f0e1d7b9a11"}}
            }),
        )
    };
    let call = |method: http::Method, token: String| {
        let uri = format!("http://{}{}", b.addr, caller.path);
        async move {
            send(
                http::Request::builder()
                    .method(method)
                    .uri(uri)
                    .header("authorization", format!("Bearer {token}"))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap(),
            )
            .await
        }
    };

    let r = call(http::Method::GET, token(&caller.sub, &caller.audience)).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let apple = b.world.standin.received();
    let last = apple.last().expect("Apple got the job's request");
    assert!(last.verdict.is_ok(), "Apple accepted the proxy's token");
    let audit = binary_audit(&b, 1).await;
    assert_eq!(audit[0]["client"], "inventory");
    assert_eq!(audit[0]["client_auth"], "oidc");
    assert_eq!(audit[0]["identity"]["subject"], caller.sub.as_str());

    let other = call(
        http::Method::GET,
        token(
            "system:serviceaccount:inventory:someone-else",
            &caller.audience,
        ),
    )
    .await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);
    let wrong_aud = call(
        http::Method::GET,
        token(&caller.sub, "https://kubernetes.default.svc"),
    )
    .await;
    assert_eq!(wrong_aud.status, StatusCode::UNAUTHORIZED);
    let write = call(http::Method::DELETE, token(&caller.sub, &caller.audience)).await;
    assert_eq!(write.status, StatusCode::FORBIDDEN);
    assert_eq!(
        b.world.standin.received().len(),
        apple.len(),
        "no refusal reached Apple"
    );
}
