//! Reading Kubernetes objects from multi-document YAML files or directories of them.
