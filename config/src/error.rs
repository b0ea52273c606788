//! Errors that say where: the file, the YAML document, the object and the field.
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based index of the YAML document within the file.
    pub document: Option<usize>,
    /// `Kind namespace/name`.
    pub object: Option<String>,
    /// Dotted path, e.g. `spec.ports[0].name`.
    pub field: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: &Path, message: impl Into<String>) -> Self {
        ConfigError { file: file.to_path_buf(), document: None, object: None, field: None, message: message.into() }
    }
    pub fn io(file: &Path, e: std::io::Error) -> Self {
        Self::new(file, format!("cannot read: {e}"))
    }
    pub fn document(mut self, n: usize) -> Self {
        self.document = Some(n);
        self
    }
    pub fn object(mut self, o: impl Into<String>) -> Self {
        self.object = Some(o.into());
        self
    }
    pub fn field(mut self, f: impl Into<String>) -> Self {
        self.field = Some(f.into());
        self
    }
    fn render(&self) -> String {
        let mut s = self.file.display().to_string();
        if let Some(d) = self.document {
            s.push_str(&format!(": document {d}"));
        }
        if let Some(o) = &self.object {
            s.push_str(&format!(": {o}"));
        }
        if let Some(f) = &self.field {
            s.push_str(&format!(": field {f}"));
        }
        s.push_str(": ");
        s.push_str(&self.message);
        s
    }
}
