//! `deploy/aks/`, the reference cloud pool an Isthmus pool forwards to: every manifest
//! validates against the Kubernetes OpenAPI schemas of a pinned version, strictly (an unknown
//! field is an error), and broken copies demonstrably fail; each kustomization lists every
//! manifest beside it; the manifests agree with each other; the README's `[upstreams.aks]`
//! example parses and matches them.
//!
//! Nothing is fetched at test time: the schemas come inside the PyPI package
//! `kubernetes-validate`, pinned in tests/python/requirements.txt and installed into the test
//! venv by scripts/test. Kustomizations and the KAITO Workspace, which Kubernetes' own schemas
//! do not cover, are checked against schemas of their own (below and in deploy/aks/kaito/).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::{Value, json};
use tests::workspace_root;

/// The Kubernetes version whose schemas the manifests must satisfy.
const KUBERNETES_VERSION: &str = "1.30.0";

/// Validates manifests. Reads `{kubernetes_version, files, schemas}` as JSON on stdin and
/// prints one entry per YAML document: the file, the document as JSON and its errors.
/// Documents of a kind in `schemas` are checked against that JSON schema (which may refer to
/// the bundled Kubernetes definitions); every other kind needs a bundled Kubernetes schema.
const VALIDATOR: &str = r#"
import importlib.resources
import json
import sys

import jsonschema
import kubernetes_validate
import referencing
import yaml

request = json.load(sys.stdin)
version = request["kubernetes_version"]
definitions = json.loads(
    (importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
     / ("v%s-local-strict" % version) / "_definitions.json").read_text(encoding="utf-8"))
registry = referencing.Registry().with_resource(
    definitions["$id"], referencing.Resource.from_contents(definitions))
schemas = {(entry["api_version"], entry["kind"]): entry["schema"] for entry in request["schemas"]}


def where(error):
    return ".".join(str(part) for part in error.absolute_path) or "(document)"


def errors_of(document):
    if not isinstance(document, dict):
        return ["a manifest must be a mapping"]
    schema = schemas.get((document.get("apiVersion"), document.get("kind")))
    if schema is not None:
        validator = jsonschema.Draft202012Validator(schema, registry=registry)
        return sorted("%s: %s" % (where(error), error.message)
                      for error in validator.iter_errors(document))
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return ["%s: %s" % (where(error), error.message)]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [error.message]
    return []


report = []
for path in request["files"]:
    try:
        with open(path, encoding="utf-8") as file:
            documents = [document for document in yaml.safe_load_all(file) if document is not None]
    except (OSError, yaml.YAMLError) as error:
        report.append({"file": path, "document": None, "errors": ["cannot load: %s" % error]})
        continue
    if not documents:
        report.append({"file": path, "document": None, "errors": ["no manifest in the file"]})
    for document in documents:
        report.append({"file": path, "document": document, "errors": errors_of(document)})
json.dump(report, sys.stdout, default=str)
"#;

/// One YAML document of a manifest file, as JSON, with what validation said about it.
#[derive(Debug)]
pub(crate) struct Manifest {
    pub(crate) file: PathBuf,
    pub(crate) document: Value,
    pub(crate) errors: Vec<String>,
}

impl Manifest {
    pub(crate) fn kind(&self) -> &str {
        self.document["kind"].as_str().unwrap_or_default()
    }

    pub(crate) fn name(&self) -> &str {
        self.document["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
    }

    fn directory(&self) -> &Path {
        self.file.parent().unwrap()
    }

    /// The document at a JSON pointer, `null` where there is nothing.
    pub(crate) fn at(&self, pointer: &str) -> &Value {
        self.document.pointer(pointer).unwrap_or(&Value::Null)
    }
}

fn aks_dir() -> PathBuf {
    workspace_root().join("deploy/aks")
}

/// The Python with `kubernetes-validate`: `ISTHMUS_TEST_PYTHON`, else the venv that
/// `scripts/test` prepares.
pub(crate) fn python() -> PathBuf {
    if let Ok(python) = std::env::var("ISTHMUS_TEST_PYTHON") {
        return PathBuf::from(python);
    }
    [
        PathBuf::from("/var/cache/isthmus/venv/bin/python"),
        workspace_root().join(".venv/bin/python"),
    ]
    .into_iter()
    .find(|candidate| {
        Command::new(candidate)
            .args(["-c", "import kubernetes_validate"])
            .output()
            .is_ok_and(|output| output.status.success())
    })
    .expect(
        "no Python with kubernetes-validate: run scripts/test, or \
         VENV/bin/python -m pip install -r tests/python/requirements.txt",
    )
}

/// The kustomize fields these layouts use; any other field is an error, so that a new one is
/// added here on purpose.
fn kustomization_schema() -> Value {
    json!({
        "type": "object",
        "required": ["apiVersion", "kind", "resources"],
        "additionalProperties": false,
        "properties": {
            "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
            "kind": {"const": "Kustomization"},
            "resources": {
                "type": "array",
                "minItems": 1,
                "uniqueItems": true,
                "items": {"type": "string"}
            }
        }
    })
}

fn workspace_schema() -> Value {
    let path = aks_dir().join("kaito/workspace.schema.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// Validates every YAML document of `files`.
pub(crate) fn validate(files: &[PathBuf]) -> Vec<Manifest> {
    let request = json!({
        "kubernetes_version": KUBERNETES_VERSION,
        "files": files,
        "schemas": [
            {
                "api_version": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "schema": kustomization_schema(),
            },
            {
                "api_version": "kaito.sh/v1beta1",
                "kind": "Workspace",
                "schema": workspace_schema(),
            },
            {
                "api_version": "cert-manager.io/v1",
                "kind": "Certificate",
                "schema": crate::helm::certificate_schema(),
            },
            {
                "api_version": "monitoring.coreos.com/v1",
                "kind": "ServiceMonitor",
                "schema": crate::helm::service_monitor_schema("monitoring.coreos.com/v1"),
            },
            {
                "api_version": "azmonitoring.coreos.com/v1",
                "kind": "ServiceMonitor",
                "schema": crate::helm::service_monitor_schema("azmonitoring.coreos.com/v1"),
            },
        ],
    });
    let mut child = Command::new(python())
        .args(["-c", VALIDATOR])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the manifest validator failed (is kubernetes-validate installed? \
         pip install -r tests/python/requirements.txt):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    report
        .into_iter()
        .map(|entry| Manifest {
            file: PathBuf::from(entry["file"].as_str().unwrap()),
            document: entry["document"].clone(),
            errors: entry["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|error| error.as_str().unwrap().to_owned())
                .collect(),
        })
        .collect()
}

/// The YAML files under `dir`, at any depth, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path
                .extension()
                .is_some_and(|extension| extension == "yaml" || extension == "yml")
            {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Every manifest under deploy/aks, validated once for all tests.
fn manifests() -> &'static [Manifest] {
    static MANIFESTS: OnceLock<Vec<Manifest>> = OnceLock::new();
    MANIFESTS.get_or_init(|| validate(&yaml_files(&aks_dir())))
}

fn of_kind(kind: &str) -> Vec<&'static Manifest> {
    manifests()
        .iter()
        .filter(|manifest| manifest.kind() == kind)
        .collect()
}

/// Whether every label of `selector` (a map) is among `labels` (a map).
pub(crate) fn selects(selector: &Value, labels: &Value) -> bool {
    let (Some(selector), Some(labels)) = (selector.as_object(), labels.as_object()) else {
        return false;
    };
    !selector.is_empty()
        && selector
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
}

fn short(path: &Path) -> String {
    path.strip_prefix(workspace_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn manifests_validate_strictly_against_the_kubernetes_schemas() {
    let failures: Vec<String> = manifests()
        .iter()
        .filter(|manifest| !manifest.errors.is_empty())
        .map(|manifest| {
            format!(
                "{} {}/{}: {}",
                short(&manifest.file),
                manifest.kind(),
                manifest.name(),
                manifest.errors.join("; ")
            )
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let kinds: BTreeSet<&str> = manifests().iter().map(Manifest::kind).collect();
    for kind in [
        "Namespace",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Secret",
        "Kustomization",
        "Workspace",
    ] {
        assert!(kinds.contains(kind), "no {kind} validated, only {kinds:?}");
    }
}

/// `text` with its one occurrence of `from` replaced by `to`.
fn mutate(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "the manifest changed: `{from}` should occur exactly once"
    );
    text.replacen(from, to, 1)
}

#[test]
fn validation_rejects_broken_manifests() {
    let dir = tests::scratch_dir();
    let read = |path: &str| std::fs::read_to_string(aks_dir().join(path)).unwrap();
    let deployment = read("deployment.yaml");
    let internal = read("service-internal.yaml");
    let workspace = read("kaito/workspace.yaml");
    let kustomization = read("kustomization.yaml");
    // (file name, text, expected in an error; None: the unchanged original, which must pass)
    let cases = [
        ("deployment.yaml", deployment.clone(), None),
        ("service-internal.yaml", internal.clone(), None),
        ("workspace.yaml", workspace.clone(), None),
        ("kustomization.yaml", kustomization.clone(), None),
        (
            "unknown-container-field.yaml",
            mutate(
                &deployment,
                "          image: vllm/vllm-openai:",
                "          gpuCount: 1\n          image: vllm/vllm-openai:",
            ),
            Some("'gpuCount' was unexpected"),
        ),
        (
            "replicas-not-a-number.yaml",
            mutate(&deployment, "  replicas: 2\n", "  replicas: two\n"),
            Some("spec.replicas: 'two' is not of type 'integer'"),
        ),
        (
            "port-as-string.yaml",
            mutate(
                &deployment,
                "containerPort: 8000",
                "containerPort: \"8000\"",
            ),
            Some("containerPort: '8000' is not of type 'integer'"),
        ),
        (
            "unknown-api-version.yaml",
            mutate(
                &deployment,
                "apiVersion: apps/v1\n",
                "apiVersion: apps/v1beta9\n",
            ),
            Some("Couldn't find schema for kind Deployment"),
        ),
        (
            "annotation-not-a-string.yaml",
            mutate(
                &internal,
                "azure-load-balancer-internal: \"true\"",
                "azure-load-balancer-internal: true",
            ),
            Some("metadata.annotations.service.beta.kubernetes.io/azure-load-balancer-internal"),
        ),
        (
            "workspace-unknown-field.yaml",
            mutate(&workspace, "  instanceType:", "  gpus: 1\n  instanceType:"),
            Some("resource: Additional properties are not allowed ('gpus' was unexpected)"),
        ),
        (
            "workspace-wrong-type.yaml",
            mutate(
                &workspace,
                "    name: phi-4-mini-instruct",
                "    name: [phi-4-mini-instruct]",
            ),
            Some("inference.preset.name"),
        ),
        (
            "kustomization-unknown-field.yaml",
            format!("{kustomization}patchesJson: []\n"),
            Some("('patchesJson' was unexpected)"),
        ),
    ];
    let files: Vec<PathBuf> = cases
        .iter()
        .map(|(name, text, _)| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect();
    let report = validate(&files);
    for ((name, _, expected), path) in cases.iter().zip(&files) {
        let errors: Vec<&String> = report
            .iter()
            .filter(|manifest| &manifest.file == path)
            .flat_map(|manifest| &manifest.errors)
            .collect();
        match expected {
            None => assert!(errors.is_empty(), "{name} must pass: {errors:?}"),
            Some(expected) => assert!(
                errors.iter().any(|error| error.contains(expected)),
                "{name} must fail with `{expected}`, got {errors:?}"
            ),
        }
    }
}

#[test]
fn kustomizations_list_every_manifest_beside_them() {
    let files = yaml_files(&aks_dir());
    let dirs: BTreeSet<&Path> = files.iter().map(|file| file.parent().unwrap()).collect();
    assert!(
        dirs.len() >= 4,
        "expected the layouts and common/: {dirs:?}"
    );
    for dir in dirs {
        let kustomization = manifests()
            .iter()
            .find(|manifest| manifest.file == dir.join("kustomization.yaml"))
            .unwrap_or_else(|| panic!("{} has no kustomization.yaml", short(dir)));
        let resources: Vec<&str> = kustomization.document["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|resource| resource.as_str().unwrap())
            .collect();
        let mut listed = BTreeSet::new();
        for resource in resources {
            let path = dir.join(resource);
            if resource.ends_with(".yaml") || resource.ends_with(".yml") {
                // kustomize loads files only from the kustomization's own directory.
                assert!(
                    !resource.contains('/') && path.is_file(),
                    "{}: `{resource}` is not a file beside it",
                    short(&kustomization.file)
                );
                listed.insert(resource.to_owned());
            } else {
                assert!(
                    path.join("kustomization.yaml").is_file(),
                    "{}: `{resource}` is not a directory with a kustomization.yaml",
                    short(&kustomization.file)
                );
            }
        }
        let beside: BTreeSet<String> = files
            .iter()
            .filter(|file| file.parent() == Some(dir))
            .map(|file| file.file_name().unwrap().to_string_lossy().into_owned())
            .filter(|name| name != "kustomization.yaml" && !name.ends_with(".example.yaml"))
            .collect();
        assert_eq!(
            listed,
            beside,
            "{} must list exactly the manifests beside it (examples excepted)",
            short(&kustomization.file)
        );
    }
    // The example Secret is validated but never applied: its value is a placeholder.
    let secret = of_kind("Secret");
    assert_eq!(secret.len(), 1);
    assert!(secret[0].file.ends_with("deploy/aks/secret.example.yaml"));
    assert!(
        secret[0]
            .at("/stringData/api-key")
            .as_str()
            .unwrap()
            .starts_with("REPLACE-ME"),
        "the example Secret must hold an obvious placeholder"
    );
}

/// What every vLLM Deployment must do for the edge and for AKS.
fn check_vllm_deployment(deployment: &Manifest) {
    let name = format!("{} {}", short(&deployment.file), deployment.name());
    assert_eq!(
        deployment.at("/metadata/namespace"),
        "isthmus-llm",
        "{name}"
    );
    assert!(
        selects(
            deployment.at("/spec/selector/matchLabels"),
            deployment.at("/spec/template/metadata/labels")
        ),
        "{name}: the selector does not select the pod template"
    );
    let pod = deployment.at("/spec/template/spec");
    assert_eq!(
        pod["nodeSelector"]["kubernetes.azure.com/accelerator"], "nvidia",
        "{name}"
    );
    assert!(
        pod["tolerations"].as_array().unwrap().contains(
            &json!({"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"})
        ),
        "{name}: no toleration for the GPU pool's taint sku=gpu:NoSchedule"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "{name}");
    let container = &containers[0];
    let image = container["image"].as_str().unwrap();
    assert!(
        image.starts_with("vllm/vllm-openai:v") && !image.contains("latest"),
        "{name}: image `{image}` is not a pinned vllm/vllm-openai release"
    );
    assert_eq!(
        container["resources"]["limits"]["nvidia.com/gpu"], 1,
        "{name}"
    );
    assert_eq!(
        container["ports"],
        json!([{"name": "http", "containerPort": 8000, "protocol": "TCP"}]),
        "{name}"
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            container[probe]["httpGet"],
            json!({"path": "/health", "port": "http"}),
            "{name}: {probe}"
        );
    }
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|arg| arg.as_str().unwrap())
        .collect();
    for flag in ["--served-model-name=", "--max-model-len=", "--port=8000"] {
        assert!(
            args.iter().any(|arg| arg.starts_with(flag)),
            "{name}: no {flag}"
        );
    }
    assert!(
        !args.iter().any(|arg| arg.starts_with("--api-key")),
        "{name}: the API key must not be on the command line"
    );
    assert!(
        container["env"].as_array().unwrap().contains(&json!({
            "name": "VLLM_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "vllm-api-key", "key": "api-key"}}
        })),
        "{name}: VLLM_API_KEY must come from Secret vllm-api-key"
    );
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"], false,
        "{name}"
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        json!(["ALL"]),
        "{name}"
    );
    let shm = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|mount| mount["mountPath"] == "/dev/shm")
        .unwrap_or_else(|| panic!("{name}: /dev/shm is not mounted"));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|volume| volume["name"] == shm["name"])
        .unwrap();
    assert_eq!(volume["emptyDir"]["medium"], "Memory", "{name}");
}

/// The pod template of a Deployment without what may differ between canary versions.
fn pod_template_without_version(deployment: &Manifest) -> Value {
    let mut template = deployment.at("/spec/template").clone();
    let labels = template["metadata"]["labels"].as_object_mut().unwrap();
    labels.remove("app.kubernetes.io/instance");
    labels.remove("version");
    for container in template["spec"]["containers"].as_array_mut().unwrap() {
        container.as_object_mut().unwrap().remove("image");
    }
    template
}

#[test]
fn manifests_agree_with_each_other() {
    let deployments = of_kind("Deployment");
    assert_eq!(deployments.len(), 3, "vllm, vllm-v1 and vllm-v2");
    for deployment in &deployments {
        check_vllm_deployment(deployment);
    }
    let secret = &of_kind("Secret")[0];
    assert_eq!(secret.name(), "vllm-api-key");
    assert!(secret.at("/stringData/api-key").is_string());

    // Each Service reaches exactly one Deployment of its layout, on the port vLLM listens on.
    for service in of_kind("Service") {
        let name = format!("{} {}", short(&service.file), service.name());
        let selector = service.at("/spec/selector");
        let reached: Vec<&str> = deployments
            .iter()
            .filter(|deployment| deployment.directory() == service.directory())
            .filter(|deployment| selects(selector, deployment.at("/spec/template/metadata/labels")))
            .map(|deployment| deployment.name())
            .collect();
        assert_eq!(reached.len(), 1, "{name} selects {reached:?}");
        assert_eq!(
            service.at("/spec/ports"),
            &json!([{
                "name": "http", "port": 8000, "targetPort": "http",
                "protocol": "TCP", "appProtocol": "http",
            }]),
            "{name}"
        );
        if service.at("/spec/type") == "LoadBalancer" {
            assert_eq!(
                service.at(
                    "/metadata/annotations/service.beta.kubernetes.io~1azure-load-balancer-internal"
                ),
                "true",
                "{name}: a load balancer for the pool must be internal"
            );
            assert_eq!(
                service.at("/spec/externalTrafficPolicy"),
                "Local",
                "{name}: the NetworkPolicy needs the edge's source address"
            );
        } else {
            assert_eq!(service.at("/spec/type"), "ClusterIP", "{name}");
        }
    }
    let load_balancers = of_kind("Service")
        .into_iter()
        .filter(|service| service.at("/spec/type") == "LoadBalancer")
        .count();
    assert_eq!(load_balancers, 3, "vllm-internal, vllm-v1 and vllm-v2");

    // The shared NetworkPolicy and disruption budget cover the pods of both layouts.
    let policy = &of_kind("NetworkPolicy")[0];
    let budget = &of_kind("PodDisruptionBudget")[0];
    for deployment in &deployments {
        let labels = deployment.at("/spec/template/metadata/labels");
        assert!(
            selects(policy.at("/spec/podSelector/matchLabels"), labels),
            "the NetworkPolicy misses {}",
            deployment.name()
        );
        assert!(
            selects(budget.at("/spec/selector/matchLabels"), labels),
            "the PodDisruptionBudget misses {}",
            deployment.name()
        );
    }
    assert_eq!(policy.at("/spec/policyTypes"), &json!(["Ingress"]));
    for rule in policy.at("/spec/ingress").as_array().unwrap() {
        assert_eq!(rule["ports"], json!([{"protocol": "TCP", "port": 8000}]));
    }

    // The canary versions: the pod spec of the main Deployment, one version label each, and
    // their own Service each.
    let main = deployments
        .iter()
        .find(|deployment| deployment.name() == "vllm")
        .unwrap();
    let canaries: Vec<&&Manifest> = deployments
        .iter()
        .filter(|deployment| deployment.directory().ends_with("canary"))
        .collect();
    let versions: BTreeSet<&str> = canaries
        .iter()
        .map(|deployment| {
            let version = deployment.at("/spec/selector/matchLabels/version");
            assert_eq!(
                deployment.at("/spec/template/metadata/labels/version"),
                version
            );
            assert_eq!(
                pod_template_without_version(deployment),
                pod_template_without_version(main),
                "canary {} drifted from deploy/aks/deployment.yaml",
                deployment.name()
            );
            version.as_str().unwrap()
        })
        .collect();
    assert_eq!(versions, BTreeSet::from(["v1", "v2"]));
    let canary_services: BTreeSet<&str> = of_kind("Service")
        .into_iter()
        .filter(|service| service.directory().ends_with("canary"))
        .map(|service| service.at("/spec/selector/version").as_str().unwrap())
        .collect();
    assert_eq!(canary_services, versions, "one Service per canary version");
}

/// The ```toml blocks of a Markdown text.
fn toml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match current.as_mut() {
            None if line.trim() == "```toml" => current = Some(String::new()),
            None => {}
            Some(block) if line.trim() == "```" => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    blocks
}

#[test]
fn readme_example_configures_the_pool_it_describes() {
    let readme = std::fs::read_to_string(aks_dir().join("README.md")).unwrap();
    let blocks = toml_blocks(&readme);
    assert_eq!(blocks.len(), 1, "one TOML example in deploy/aks/README.md");
    let table: toml::Table = toml::from_str(&blocks[0])
        .unwrap_or_else(|error| panic!("the README's TOML does not parse: {error}"));
    let config = serde_json::to_value(&table).unwrap();
    let pool = &config["upstreams"]["aks"];
    assert_eq!(pool["fallback_to_local"], true);

    let deployments = of_kind("Deployment");
    let served: BTreeSet<&str> = deployments
        .iter()
        .flat_map(|deployment| {
            deployment
                .at("/spec/template/spec/containers/0/args")
                .as_array()
                .unwrap()
        })
        .filter_map(|arg| arg.as_str()?.strip_prefix("--served-model-name="))
        .collect();
    let models = pool["models"].as_object().unwrap();
    assert!(!models.is_empty());
    for (client, target) in models {
        assert!(
            served.contains(target.as_str().unwrap()),
            "models.{client} = {target} is not a served model name of deploy/aks: {served:?}"
        );
    }

    let backends = pool["backends"].as_array().unwrap();
    let mut versions = BTreeSet::new();
    for backend in backends {
        assert!(
            backend["url"].as_str().unwrap().starts_with("https://"),
            "{backend}"
        );
        assert!(
            backend["weight"].as_u64().is_some_and(|weight| weight > 0),
            "{backend}: weight must be a positive integer"
        );
        versions.insert(backend["labels"]["version"].as_str().unwrap());
    }
    let canary_versions: BTreeSet<&str> = deployments
        .iter()
        .filter_map(|deployment| {
            deployment
                .at("/spec/template/metadata/labels/version")
                .as_str()
        })
        .collect();
    assert_eq!(versions, canary_versions, "one backend per canary version");

    assert!(pool["tls"]["ca_file"].is_string());
    assert_eq!(pool["auth"]["kind"], "bearer");
    assert!(pool["auth"]["token_file"].is_string());
    let probe_path =
        deployments[0].at("/spec/template/spec/containers/0/readinessProbe/httpGet/path");
    assert_eq!(&pool["health"]["path"], probe_path);
    assert!(
        pool["health"]["interval_ms"]
            .as_u64()
            .is_some_and(|interval| interval > 0),
        "health.interval_ms must be a positive integer"
    );
}

// deploy/sidecar: Isthmus beside an application, in the image deploy/container/build-image
// makes (tests/it/package.rs runs that image with this configuration and these probes).

/// The user the image runs as (deploy/container/build-image).
pub(crate) const IMAGE_USER: u64 = 65532;

fn sidecar_dir() -> PathBuf {
    workspace_root().join("deploy/sidecar")
}

/// Every manifest under deploy/sidecar, validated.
fn sidecar_manifests() -> &'static [Manifest] {
    static MANIFESTS: OnceLock<Vec<Manifest>> = OnceLock::new();
    MANIFESTS.get_or_init(|| validate(&yaml_files(&sidecar_dir())))
}

fn sidecar_of_kind(kind: &str) -> &'static Manifest {
    let found: Vec<&Manifest> = sidecar_manifests()
        .iter()
        .filter(|manifest| manifest.kind() == kind)
        .collect();
    assert_eq!(found.len(), 1, "deploy/sidecar: one {kind} expected");
    found[0]
}

/// The gateway's configuration as the sidecar's ConfigMap holds it.
pub(crate) fn sidecar_config_text() -> String {
    sidecar_of_kind("ConfigMap")
        .at("/data/isthmus.toml")
        .as_str()
        .expect("the ConfigMap holds isthmus.toml")
        .to_owned()
}

/// The sidecar container of the Deployment (a native sidecar: an init container).
pub(crate) fn sidecar_container() -> &'static Value {
    sidecar_of_kind("Deployment").at("/spec/template/spec/initContainers/0")
}

/// The command of one of the sidecar's probes.
pub(crate) fn sidecar_probe(probe: &str) -> Vec<String> {
    sidecar_container()[probe]["exec"]["command"]
        .as_array()
        .unwrap_or_else(|| panic!("the sidecar has no exec {probe}"))
        .iter()
        .map(|part| part.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn sidecar_manifests_validate_and_agree_with_its_configuration() {
    let failures: Vec<String> = sidecar_manifests()
        .iter()
        .filter(|manifest| !manifest.errors.is_empty())
        .map(|manifest| {
            format!(
                "{} {}: {}",
                short(&manifest.file),
                manifest.kind(),
                manifest.errors.join("; ")
            )
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let listed: BTreeSet<&str> = sidecar_of_kind("Kustomization").document["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|resource| resource.as_str().unwrap())
        .collect();
    let beside: BTreeSet<String> = yaml_files(&sidecar_dir())
        .iter()
        .map(|file| file.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|name| name != "kustomization.yaml" && !name.ends_with(".example.yaml"))
        .collect();
    assert_eq!(
        listed,
        beside.iter().map(String::as_str).collect(),
        "deploy/sidecar/kustomization.yaml must list every manifest beside it but the examples"
    );
    // An example Secret applied with the layout would put its placeholder key, which anyone
    // can read here, over the real one.
    assert!(
        !listed.iter().any(|name| name.ends_with(".example.yaml")),
        "{listed:?}"
    );

    let config: toml::Value = toml::from_str(&sidecar_config_text()).unwrap();
    let server = &config["server"];
    let str_of = |value: &toml::Value| value.as_str().unwrap().to_owned();
    let admin = str_of(&server["admin_listen"]);
    let plain = str_of(&server["plain_listen"]);
    assert!(admin.starts_with("127.0.0.1:") && plain.starts_with("127.0.0.1:"));

    let deployment = sidecar_of_kind("Deployment");
    let sidecar = sidecar_container();
    assert_eq!(sidecar["name"], "isthmus");
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(
        sidecar["args"],
        json!(["serve", "--config", "/etc/isthmus/isthmus.toml"])
    );
    for (probe, path) in [
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ] {
        assert_eq!(
            sidecar_probe(probe),
            ["/usr/bin/isthmus", "probe", "--admin", admin.as_str(), path],
            "{probe} must ask the configured admin listener"
        );
    }
    assert_eq!(sidecar["securityContext"]["runAsUser"], IMAGE_USER);
    assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);

    // Volumes where the configuration expects them, and each source declared here.
    let mounts: Vec<(String, String)> = sidecar["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|mount| {
            (
                str_of_json(&mount["name"]),
                str_of_json(&mount["mountPath"]),
            )
        })
        .collect();
    let mounted_at = |path: &str| {
        mounts
            .iter()
            .find(|(_, mount_path)| mount_path == path)
            .map(|(name, _)| name.clone())
            .unwrap_or_else(|| panic!("nothing mounted at {path}: {mounts:?}"))
    };
    let volume = |name: &str| -> &Value {
        deployment
            .at("/spec/template/spec/volumes")
            .as_array()
            .unwrap()
            .iter()
            .find(|volume| volume["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    let config_volume = volume(&mounted_at("/etc/isthmus"));
    assert_eq!(
        config_volume["configMap"]["name"],
        sidecar_of_kind("ConfigMap").name()
    );
    assert!(volume(&mounted_at(&str_of(&server["state_dir"])))["emptyDir"].is_object());
    let model_path = str_of(&config["models"]["local"]["path"]);
    let model_dir = Path::new(&model_path).parent().unwrap().to_str().unwrap();
    assert_eq!(
        volume(&mounted_at(model_dir))["persistentVolumeClaim"]["claimName"],
        sidecar_of_kind("PersistentVolumeClaim").name()
    );

    // The API key: the variable the configuration names, from the Secret the app reads too.
    let key_env = str_of(&config["auth"]["api_keys"][0]["key_env"]);
    let secret_name = sidecar_of_kind("Secret").name();
    let env_of = |container: &Value, name: &str| -> Value {
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|variable| variable["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{} has no {name}", container["name"]))
    };
    assert_eq!(
        env_of(sidecar, &key_env)["valueFrom"]["secretKeyRef"]["name"],
        secret_name
    );
    let app = deployment.at("/spec/template/spec/containers/0");
    assert_eq!(
        env_of(app, "OPENAI_API_KEY")["valueFrom"]["secretKeyRef"]["name"],
        secret_name
    );
    assert_eq!(
        env_of(app, "OPENAI_BASE_URL")["value"],
        format!("http://{plain}/v1")
    );

    // The pod waits for the drain.
    let drain_ms = server["drain_timeout_ms"].as_integer().unwrap();
    let grace_s = deployment
        .at("/spec/template/spec/terminationGracePeriodSeconds")
        .as_i64()
        .unwrap();
    assert!(
        grace_s * 1000 > drain_ms,
        "grace {grace_s} s, drain {drain_ms} ms"
    );
}

fn str_of_json(value: &Value) -> String {
    value.as_str().unwrap().to_owned()
}

#[test]
fn the_sidecar_configuration_validates_where_the_pod_mounts_it() {
    let dir = tests::scratch_dir();
    let text = sidecar_config_text()
        .replace("/models/model.gguf", tests::model_path().to_str().unwrap())
        .replace(
            "/var/lib/isthmus",
            dir.path().join("state").to_str().unwrap(),
        );
    let path = dir.path().join("isthmus.toml");
    std::fs::write(&path, text).unwrap();
    let output = Command::new(tests::isthmus_binary())
        .arg("check-config")
        .arg(&path)
        .env("ISTHMUS_API_KEY", "sidecar-test-key")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
