//! The files a config names (schemas, jq mappings, models, samples), read
//! relative to the config file and compiled into each flow's
//! [`Pipeline`]. Samples are run through the pipeline they belong to, so
//! `dovetail check` proves that a mapping's output matches its model.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::load::{Finding, Loaded};
use super::{ConfigErrors, MappingConfig, Resolved};
use crate::mapping::{Mapping, Program};
use crate::pipeline::{Model, Pipeline};
use crate::schema::Schema;

/// Reads a file relative to the config; tests pass an in-memory map.
pub type ReadFile<'r> = &'r dyn Fn(&Path) -> std::io::Result<String>;

/// Most jq compile errors listed for one mapping.
const MAX_JQ_ERRORS: usize = 5;

struct Files<'a> {
    base: &'a Path,
    read: ReadFile<'a>,
    findings: Vec<Finding>,
}

impl Files<'_> {
    fn text(&mut self, at: &[&str], file: &str) -> Option<(String, String)> {
        let path = self.base.join(file);
        match (self.read)(&path) {
            Ok(t) => Some((path.display().to_string(), t)),
            Err(e) => {
                self.findings.push(Finding::error(
                    at,
                    format!("cannot read {}: {e}", path.display()),
                    "give a path relative to the config file",
                ));
                None
            }
        }
    }

    fn schema(&mut self, at: &[&str], file: &str) -> Option<Arc<Schema>> {
        let (path, text) = self.text(at, file)?;
        let document: serde_json::Value = match serde_json::from_str(&text) {
            Ok(d) => d,
            Err(e) => {
                self.findings.push(Finding::error(
                    at,
                    format!("{path} is not JSON: {e}"),
                    "a schema is a JSON document",
                ));
                return None;
            }
        };
        match Schema::compile(&document) {
            Ok(schema) => Some(Arc::new(schema)),
            Err(e) => {
                self.findings.push(Finding::error(
                    at,
                    format!("{path} is not a valid JSON Schema: {e}"),
                    "see https://json-schema.org/draft/2020-12; $refs must stay inside the file",
                ));
                None
            }
        }
    }

    fn mapping(&mut self, at: &[&str], m: &MappingConfig) -> Option<Arc<Mapping>> {
        let mut file_at = at.to_vec();
        file_at.push("file");
        let (path, code) = self.text(&file_at, &m.file)?;
        match Program::compile(&code) {
            Ok(program) => Some(Arc::new(Mapping { program, version: m.version })),
            Err(errors) => {
                let listed: Vec<String> = errors.iter().take(MAX_JQ_ERRORS).map(|e| format!("{path}:{e}")).collect();
                let more = errors.len().saturating_sub(MAX_JQ_ERRORS);
                let more = if more > 0 { format!(" (and {more} more)") } else { String::new() };
                self.findings.push(Finding::error(
                    &file_at,
                    format!("the jq program does not compile: {}{more}", listed.join("; ")),
                    "fix the program; `jq -n -f FILE` shows the same position",
                ));
                None
            }
        }
    }

    /// The records in a sample file: one JSON document, or one per line
    /// for `.jsonl` / `.ndjson`; each labelled `file` or `file:line`.
    fn samples(&mut self, at: &[&str], file: &str) -> Vec<(String, serde_json::Value)> {
        let Some((path, text)) = self.text(at, file) else { return Vec::new() };
        let lines = file.ends_with(".jsonl") || file.ends_with(".ndjson");
        let docs: Vec<(String, &str)> = if lines {
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| (format!("{path}:{}", i + 1), l))
                .collect()
        } else {
            vec![(path, text.as_str())]
        };
        let mut out = Vec::with_capacity(docs.len());
        for (label, doc) in docs {
            match serde_json::from_str(doc) {
                Ok(v) => out.push((label, v)),
                Err(e) => self.findings.push(Finding::error(
                    at,
                    format!("sample {label} is not JSON: {e}"),
                    "a sample is one JSON record (or one per line in a .jsonl file)",
                )),
            }
        }
        out
    }
}

impl Loaded {
    /// Builds each flow's pipeline (see [`Loaded::pipelines`]) into `resolved`.
    pub fn attach_files(&self, resolved: &mut Resolved, read: ReadFile<'_>) -> Result<(), ConfigErrors> {
        for (name, pipeline) in self.pipelines(read)? {
            if let Some(f) = resolved.flows.get_mut(&name) {
                f.pipeline = pipeline;
            }
        }
        Ok(())
    }

    /// Reads and compiles every file the config names, builds each flow's
    /// pipeline, and runs the samples through it. Every problem is reported
    /// at the key that names the file. Needs no secrets.
    pub fn pipelines(&self, read: ReadFile<'_>) -> Result<BTreeMap<String, Arc<Pipeline>>, ConfigErrors> {
        self.build_pipelines(read, true)
    }

    /// The pipelines without running the samples: for `dovetail test`,
    /// which is how one finds out why a sample is refused.
    pub fn pipelines_without_samples(
        &self,
        read: ReadFile<'_>,
    ) -> Result<BTreeMap<String, Arc<Pipeline>>, ConfigErrors> {
        self.build_pipelines(read, false)
    }

    fn build_pipelines(
        &self,
        read: ReadFile<'_>,
        run_samples: bool,
    ) -> Result<BTreeMap<String, Arc<Pipeline>>, ConfigErrors> {
        let mut pipelines = BTreeMap::new();
        let mut files = Files { base: self.base_dir(), read, findings: Vec::new() };
        let mut models = BTreeMap::new();
        for (name, m) in &self.config.models {
            let Some(schema) = files.schema(&["models", name, "schema"], &m.schema) else { continue };
            let at = ["models", name.as_str(), "samples"];
            for sample in m.samples.iter().filter(|_| run_samples) {
                for (label, value) in files.samples(&at, sample) {
                    let violations = schema.violations(&value);
                    if !violations.is_empty() {
                        files.findings.push(Finding::error(
                            &at,
                            format!(
                                "sample {label} does not match the model: {}",
                                crate::schema::describe(&violations)
                            ),
                            "fix the sample or the model's schema",
                        ));
                    }
                }
            }
            models.insert(name.clone(), Model { name: name.clone(), schema });
        }
        for (name, flow) in &self.config.flows {
            let before = files.findings.len();
            let schema = flow.schema.as_ref().and_then(|f| files.schema(&["flows", name, "schema"], f));
            let mapping = flow.mapping.as_ref().and_then(|m| files.mapping(&["flows", name, "mapping"], m));
            let sink_mapping = flow.sink.mapping().and_then(|m| files.mapping(&["flows", name, "sink", "mapping"], m));
            let model = flow.model.as_ref().and_then(|m| models.get(m).cloned());
            let pipeline = Pipeline {
                schema,
                key: flow.key.clone(),
                idempotency_key: flow.idempotency_key.clone(),
                mapping,
                model,
                sink_mapping,
            };
            // Samples prove a whole pipeline; a broken part was reported already.
            if run_samples && files.findings.len() == before {
                let at = ["flows", name.as_str(), "samples"];
                for sample in &flow.samples {
                    for (label, value) in files.samples(&at, sample) {
                        if let Err(r) = pipeline.keys(&value).and_then(|_| pipeline.transform(&value)) {
                            files.findings.push(Finding::error(
                                &at,
                                format!("sample {label} is refused at the {} stage: {}", r.stage.as_str(), r.reason),
                                "fix the mapping, the schema or the sample; `dovetail test FLOW --input FILE` shows each stage",
                            ));
                        }
                    }
                }
            }
            pipelines.insert(name.clone(), Arc::new(pipeline));
        }
        if files.findings.is_empty() { Ok(pipelines) } else { Err(ConfigErrors(self.locate(files.findings))) }
    }
}
