//! Reading Kubernetes objects from multi-document YAML files or directories of them.
//!
//! Each document is read as a generic tree first (so broken YAML is reported with its line and
//! column), its `apiVersion`/`kind` are peeked, and it is then deserialized strictly into the
//! k8s-openapi type: a field the type does not know is an error naming that field, as kubectl's
//! strict validation does. `kind: List` (and `ServiceList` & co., as `kubectl get -o yaml` writes
//! them) is unpacked. `discovery.k8s.io/v1beta1` EndpointSlices are converted to v1.

use crate::error::ConfigError;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt;
use std::path::{Path, PathBuf};

/// Where an object was read from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Source {
    /// The file, or for objects from the Kubernetes API the server's URL.
    pub file: PathBuf,
    /// 1-based index of the YAML document within the file; 0 for an object from the API server.
    pub document: usize,
}

impl Source {
    /// An object read from the Kubernetes API server at `server`.
    pub fn api(server: &str) -> Source {
        Source { file: PathBuf::from(server), document: 0 }
    }

    /// An error located at this document.
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        let e = ConfigError::new(&self.file, message);
        if self.document == 0 {
            e
        } else {
            e.document(self.document)
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.document == 0 {
            write!(f, "{}", self.file.display())
        } else {
            write!(f, "{}: document {}", self.file.display(), self.document)
        }
    }
}

/// A `discovery.k8s.io/v1beta1` EndpointSlice (as API servers before 1.21 serve them, in JSON)
/// converted to v1.
pub fn endpoint_slice_from_v1beta1(value: Value, source: &Source) -> Result<EndpointSlice, ConfigError> {
    let value = endpoint_slice_v1beta1_to_v1(value, source, "")?;
    strict::<EndpointSlice>(value, source, "")
}

/// An object and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Sourced<T> {
    pub source: Source,
    pub object: T,
}

/// Everything read from manifests, in file and document order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub services: Vec<Sourced<Service>>,
    pub endpoint_slices: Vec<Sourced<EndpointSlice>>,
    pub ingresses: Vec<Sourced<Ingress>>,
    pub ingress_classes: Vec<Sourced<IngressClass>>,
    pub secrets: Vec<Sourced<Secret>>,
    /// Objects of kinds Fulcrum does not use (Deployment, ConfigMap, ...): where, and
    /// `apiVersion/kind` (e.g. `apps/v1/Deployment`).
    pub skipped: Vec<(Source, String)>,
}

/// `Kind namespace/name` as errors name objects; the namespace defaults to `default`.
pub fn object_name(kind: &str, meta: &ObjectMeta) -> String {
    format!("{kind} {}/{}", meta.namespace.as_deref().unwrap_or("default"), meta.name.as_deref().unwrap_or("<unnamed>"))
}

/// Reads a YAML file, or every `*.yaml`/`*.yml` file of a directory (not recursive, sorted by name).
pub fn load(path: &Path) -> Result<Objects, ConfigError> {
    let meta = std::fs::metadata(path).map_err(|e| ConfigError::io(path, e))?;
    let mut objects = Objects::default();
    if meta.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|e| ConfigError::io(path, e))? {
            let entry = entry.map_err(|e| ConfigError::io(path, e))?;
            let p = entry.path();
            let yaml = matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
            if yaml && p.is_file() {
                files.push(p);
            }
        }
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| ConfigError::io(&file, e))?;
            objects.parse_into(&file, &text)?;
        }
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, e))?;
        objects.parse_into(path, &text)?;
    }
    Ok(objects)
}

impl Objects {
    /// Parses one file's text; `path` is only used in sources and error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Objects, ConfigError> {
        let mut objects = Objects::default();
        objects.parse_into(path, text)?;
        Ok(objects)
    }

    /// Parses one file's text and appends its objects.
    pub fn parse_into(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let source = Source { file: path.to_path_buf(), document: i + 1 };
            let value = Value::deserialize(doc).map_err(|e| source.error(format!("invalid YAML: {e}")))?;
            if value.is_null() {
                continue; // empty document, or only comments
            }
            self.add(&source, value, "")?;
        }
        Ok(())
    }

    fn add(&mut self, source: &Source, value: Value, prefix: &str) -> Result<(), ConfigError> {
        let at = |field: &str| format!("{prefix}{field}");
        let Value::Object(map) = &value else {
            let e = source.error(format!("expected a Kubernetes object (a mapping), found {}", type_name(&value)));
            return Err(if prefix.is_empty() { e } else { e.field(prefix.trim_end_matches('.')) });
        };
        let text = |key: &str| -> Result<String, ConfigError> {
            match map.get(key) {
                Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(other) => {
                    Err(source.error(format!("must be a non-empty string, found {}", type_name(other))).field(at(key)))
                }
                None => Err(source.error("missing: every object needs apiVersion and kind").field(at(key))),
            }
        };
        let kind = text("kind")?;
        let api_version = text("apiVersion")?;
        let name = object_label(&kind, map);
        let located = |e: ConfigError| e.object(name.clone());

        if kind == "List" || (kind.ends_with("List") && map.contains_key("items")) {
            let items = match map.get("items") {
                Some(Value::Array(items)) => items.clone(),
                Some(Value::Null) | None => Vec::new(),
                Some(other) => {
                    return Err(source.error(format!("must be a list, found {}", type_name(other))).field(at("items")))
                }
            };
            for (j, item) in items.into_iter().enumerate() {
                self.add(source, item, &format!("{prefix}items[{j}]."))?;
            }
            return Ok(());
        }

        let wrong_version = |expected: &str| {
            located(
                source
                    .error(format!("{kind} {api_version:?} is not supported; use {expected}"))
                    .field(at("apiVersion")),
            )
        };
        let src = source.clone();
        match (kind.as_str(), api_version.as_str()) {
            ("Service", "v1") => {
                let object = strict::<Service>(value, source, prefix).map_err(located)?;
                self.services.push(Sourced { source: src, object });
            }
            ("Service", _) => return Err(wrong_version("v1")),
            ("EndpointSlice", "discovery.k8s.io/v1") => {
                let object = strict::<EndpointSlice>(value, source, prefix).map_err(located)?;
                self.endpoint_slices.push(Sourced { source: src, object });
            }
            ("EndpointSlice", "discovery.k8s.io/v1beta1") => {
                let value = endpoint_slice_v1beta1_to_v1(value, source, prefix).map_err(located)?;
                let object = strict::<EndpointSlice>(value, source, prefix).map_err(located)?;
                self.endpoint_slices.push(Sourced { source: src, object });
            }
            ("EndpointSlice", _) => return Err(wrong_version("discovery.k8s.io/v1 or discovery.k8s.io/v1beta1")),
            ("Ingress", "networking.k8s.io/v1") => {
                let object = strict::<Ingress>(value, source, prefix).map_err(located)?;
                self.ingresses.push(Sourced { source: src, object });
            }
            ("Ingress", _) => return Err(wrong_version("networking.k8s.io/v1")),
            ("IngressClass", "networking.k8s.io/v1") => {
                let object = strict::<IngressClass>(value, source, prefix).map_err(located)?;
                self.ingress_classes.push(Sourced { source: src, object });
            }
            ("IngressClass", _) => return Err(wrong_version("networking.k8s.io/v1")),
            ("Secret", "v1") => {
                let object = strict::<Secret>(value, source, prefix).map_err(located)?;
                self.secrets.push(Sourced { source: src, object });
            }
            ("Secret", _) => return Err(wrong_version("v1")),
            _ => self.skipped.push((src, format!("{api_version}/{kind}"))),
        }
        Ok(())
    }
}

/// `Kind ns/name` from a raw object, before it is typed.
fn object_label(kind: &str, map: &Map<String, Value>) -> String {
    let meta = map.get("metadata");
    let get = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str);
    format!("{kind} {}/{}", get("namespace").unwrap_or("default"), get("name").unwrap_or("<unnamed>"))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Deserializes `value` into `T`, rejecting fields `T` does not know.
fn strict<T: DeserializeOwned>(value: Value, source: &Source, prefix: &str) -> Result<T, ConfigError> {
    let mut unknown: Vec<String> = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| unknown.push(render_ignored(&path));
    let result: Result<T, _> = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut record));
    match result {
        Err(e) => {
            let field = format!("{prefix}{}", e.path());
            let field = field.trim_end_matches('.').to_string();
            let err = source.error(e.into_inner().to_string());
            Err(if field.is_empty() { err } else { err.field(field) })
        }
        Ok(object) => match unknown.first() {
            Some(field) => {
                let key = field.rsplit(['.', '[']).next().unwrap_or(field).trim_end_matches(']');
                Err(source.error(format!("unknown field {key:?}")).field(format!("{prefix}{field}")))
            }
            None => Ok(object),
        },
    }
}

/// `spec.ports[0].foo` for a path serde_ignored reports.
fn render_ignored(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", render_ignored(parent)),
        P::Map { parent, key } => {
            let p = render_ignored(parent);
            if p.is_empty() {
                key.clone()
            } else {
                format!("{p}.{key}")
            }
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => render_ignored(parent),
    }
}

/// discovery.k8s.io/v1beta1 -> v1, as the API server converts it: per endpoint, `topology`
/// becomes `nodeName` (from `kubernetes.io/hostname`), `zone` (from `topology.kubernetes.io/zone`)
/// and `deprecatedTopology` (the rest). Everything else has the same shape.
fn endpoint_slice_v1beta1_to_v1(mut value: Value, source: &Source, prefix: &str) -> Result<Value, ConfigError> {
    value["apiVersion"] = Value::String("discovery.k8s.io/v1".into());
    let Some(Value::Array(endpoints)) = value.get_mut("endpoints") else {
        return Ok(value);
    };
    for (i, ep) in endpoints.iter_mut().enumerate() {
        let Value::Object(ep) = ep else { continue }; // the typed pass reports it
        let field = |f: &str| format!("{prefix}endpoints[{i}].{f}");
        if ep.contains_key("deprecatedTopology") || ep.contains_key("zone") {
            let f = if ep.contains_key("zone") { "zone" } else { "deprecatedTopology" };
            return Err(source
                .error(format!("unknown field {f:?} (not a discovery.k8s.io/v1beta1 field)"))
                .field(field(f)));
        }
        let mut topology = match ep.remove("topology") {
            None | Some(Value::Null) => continue,
            Some(Value::Object(t)) => t,
            Some(other) => {
                return Err(source
                    .error(format!("must be a mapping, found {}", type_name(&other)))
                    .field(field("topology")))
            }
        };
        if let Some(host) = topology.remove("kubernetes.io/hostname") {
            ep.entry("nodeName").or_insert(host);
        }
        if let Some(zone) = topology.remove("topology.kubernetes.io/zone") {
            ep.insert("zone".into(), zone);
        }
        if !topology.is_empty() {
            ep.insert("deprecatedTopology".into(), Value::Object(topology));
        }
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Objects, ConfigError> {
        Objects::parse(Path::new("m.yaml"), text)
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("must be rejected").to_string()
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n\
                       spec: {type: LoadBalancer, ports: [{port: 80}]}\n";

    #[test]
    fn multi_document_with_empty_documents() {
        let text = format!(
            "---\n# only a comment\n---\n{SVC}---\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n"
        );
        let o = parse(&text).unwrap();
        assert_eq!(o.services.len(), 1);
        let s = &o.services[0];
        // Documents: (comment only), SVC, (empty), Deployment.
        assert_eq!(s.source, Source { file: "m.yaml".into(), document: 2 });
        assert_eq!(s.object.metadata.name.as_deref(), Some("web"));
        assert_eq!(s.object.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port, 80);
        assert_eq!(o.skipped, vec![(Source { file: "m.yaml".into(), document: 4 }, "apps/v1/Deployment".to_string())]);
    }

    #[test]
    fn kind_list_is_unpacked() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Secret\n  metadata: {name: tls}\n  \
                    type: kubernetes.io/tls\n  data: {tls.crt: QUJD, tls.key: REVG}\n\
                    - apiVersion: v1\n  kind: ServiceList\n  items: []\n\
                    - apiVersion: networking.k8s.io/v1\n  kind: IngressClass\n  metadata: {name: fulcrum}\n  spec: {controller: fulcrum.io/ingress}\n\
                    - apiVersion: networking.k8s.io/v1\n  kind: Ingress\n  metadata: {name: site}\n  \
                    spec: {ingressClassName: fulcrum, rules: [{host: a.example, http: {paths: [{path: /, pathType: Prefix, \
                    backend: {service: {name: web, port: {number: 80}}}}]}}]}\n";
        let o = parse(text).unwrap();
        assert_eq!(o.secrets.len(), 1);
        assert_eq!(o.secrets[0].object.data.as_ref().unwrap()["tls.crt"].0, b"ABC");
        assert_eq!(
            o.ingress_classes[0].object.spec.as_ref().unwrap().controller.as_deref(),
            Some("fulcrum.io/ingress")
        );
        assert_eq!(
            o.ingresses[0].object.spec.as_ref().unwrap().rules.as_ref().unwrap()[0].host.as_deref(),
            Some("a.example")
        );
        assert!(o.services.is_empty() && o.skipped.is_empty());
    }

    #[test]
    fn unknown_field_in_object_is_named() {
        let e = err(&SVC.replace("ports: [{port: 80}]", "ports: [{port: 80, prot: UDP}]"));
        assert_eq!(e, "m.yaml: document 1: Service demo/web: field spec.ports[0].prot: unknown field \"prot\"");
        let e = err(&SVC.replace("metadata:", "metdata: {}\nmetadata:"));
        assert!(e.contains("field metdata: unknown field \"metdata\""), "{e}");
    }

    #[test]
    fn unknown_field_inside_a_list_item_has_the_items_prefix() {
        let item = SVC.replace("spec: {", "spec: {bogus: 1, ").replace('\n', "\n  ");
        let e = err(&format!("apiVersion: v1\nkind: List\nitems:\n- {item}"));
        assert!(e.contains("Service demo/web: field items[0].spec.bogus: unknown field"), "{e}");
    }

    #[test]
    fn type_errors_name_the_field() {
        let e = err(&SVC.replace("port: 80", "port: eighty"));
        assert!(e.starts_with("m.yaml: document 1: Service demo/web: field spec.ports[0].port: invalid type"), "{e}");
    }

    #[test]
    fn broken_yaml_names_document_line_and_column() {
        let text = format!("{SVC}---\napiVersion: v1\nkind: Service\nmetadata: {{name: x\nspec: {{}}\n");
        let e = err(&text);
        assert!(e.starts_with("m.yaml: document 2: invalid YAML: "), "{e}");
        assert!(e.contains("line 8 column"), "{e}");
    }

    #[test]
    fn missing_kind_and_wrong_versions() {
        let e = err("apiVersion: v1\nmetadata: {name: x}\n");
        assert!(e.contains("field kind: missing"), "{e}");
        let e = err("- a\n- b\n");
        assert!(e.contains("expected a Kubernetes object"), "{e}");
        let e = err(&SVC.replace("apiVersion: v1", "apiVersion: v2"));
        assert!(e.contains("Service demo/web: field apiVersion: Service \"v2\" is not supported"), "{e}");
        let e = err("apiVersion: extensions/v1beta1\nkind: Ingress\nmetadata: {name: old}\n");
        assert!(e.contains("Ingress default/old: field apiVersion"), "{e}");
    }

    #[test]
    fn endpoint_slice_v1beta1_is_converted() {
        let text = "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s, namespace: n}\n\
                    addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n\
                    - addresses: [10.0.0.1]\n  conditions: {ready: true}\n  \
                    topology: {kubernetes.io/hostname: node-1, topology.kubernetes.io/zone: z1, example.com/rack: r7}\n\
                    - addresses: [10.0.0.2]\n";
        let o = parse(text).unwrap();
        let s = &o.endpoint_slices[0].object;
        let e0 = &s.endpoints[0];
        assert_eq!(e0.node_name.as_deref(), Some("node-1"));
        assert_eq!(e0.zone.as_deref(), Some("z1"));
        let rest = e0.deprecated_topology.as_ref().unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest["example.com/rack"], "r7");
        assert_eq!(s.endpoints[1].node_name, None);
        // v1-only fields are not v1beta1 fields; unknown v1beta1 fields are still caught.
        let e = err(&text.replace("  conditions: {ready: true}\n", "  zone: z\n"));
        assert!(e.contains("field endpoints[0].zone: unknown field"), "{e}");
        let e = err(&text.replace("  conditions: {ready: true}\n", "  conditionz: {}\n"));
        assert!(e.contains("EndpointSlice n/s: field endpoints[0].conditionz: unknown field"), "{e}");
        // And v1 does not take v1beta1's topology.
        let e = err(&text.replace("v1beta1", "v1"));
        assert!(e.contains("field endpoints[0].topology: unknown field"), "{e}");
    }

    #[test]
    fn directory_is_read_sorted_yaml_only() {
        let dir = std::env::temp_dir().join(format!("fulcrum-config-manifests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("b.yaml"), SVC.replace("name: web", "name: b")).unwrap();
        std::fs::write(dir.join("a.yml"), SVC.replace("name: web", "name: a")).unwrap();
        std::fs::write(dir.join("c.txt"), "not: yaml: at all: [").unwrap();
        let o = load(&dir).unwrap();
        let names: Vec<_> = o.services.iter().map(|s| s.object.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(o.services[1].source.file, dir.join("b.yaml"));
        let e = load(&dir.join("missing.yaml")).unwrap_err().to_string();
        assert!(e.contains("missing.yaml: cannot read"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
