//! The pipeline grammar: `"cache -> retry -> sharded -> file"`, checked against the registry.

use std::fmt;

use crate::registry::{self, Kind};

/// A stage with the place it holds in its pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The stage's name.
    pub name: String,
    /// What it is in this pipeline.
    pub kind: Kind,
}

/// A checked pipeline, from the client down to storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    /// Block layers, top first.
    pub layers: Vec<String>,
    /// The layout.
    pub layout: String,
    /// Store wrappers, top first.
    pub wrappers: Vec<String>,
    /// The store.
    pub store: String,
}

impl Pipeline {
    /// Every stage, top first, with its kind.
    pub fn stages(&self) -> Vec<Placed> {
        let mut v = Vec::new();
        v.extend(self.layers.iter().map(|n| Placed {
            name: n.clone(),
            kind: Kind::Layer,
        }));
        v.push(Placed {
            name: self.layout.clone(),
            kind: Kind::Layout,
        });
        v.extend(self.wrappers.iter().map(|n| Placed {
            name: n.clone(),
            kind: Kind::StoreWrapper,
        }));
        v.push(Placed {
            name: self.store.clone(),
            kind: Kind::Store,
        });
        v
    }

    /// True if the stage is part of this pipeline.
    pub fn contains(&self, name: &str) -> bool {
        self.layout == name
            || self.store == name
            || self.layers.iter().any(|l| l == name)
            || self.wrappers.iter().any(|w| w == name)
    }
}

impl fmt::Display for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self
            .layers
            .iter()
            .chain(std::iter::once(&self.layout))
            .chain(self.wrappers.iter())
            .chain(std::iter::once(&self.store))
            .map(String::as_str)
            .collect();
        f.write_str(&names.join(" -> "))
    }
}

/// Parses and type-checks a pipeline. The error says which stage breaks which rule.
pub fn parse(text: &str) -> Result<Pipeline, String> {
    let names: Vec<&str> = text.split("->").map(str::trim).collect();
    if names.iter().any(|n| n.is_empty()) {
        return Err(format!(
            "pipeline {text:?} has an empty stage: write stages separated by \"->\", like \"cache -> sharded -> file\""
        ));
    }
    let mut stages = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let Some(stage) = registry::stage(name) else {
            return Err(format!(
                "pipeline {text:?}: unknown stage {name:?} (run `nbd-rs drivers` for the list)"
            ));
        };
        if names[..i].contains(name) {
            return Err(format!("pipeline {text:?}: stage {name:?} appears twice"));
        }
        stages.push(stage);
    }

    let Some(layout_at) = stages.iter().position(|s| s.kinds.contains(&Kind::Layout)) else {
        return Err(format!(
            "pipeline {text:?} has no layout: exactly one of {} must stand above the store",
            registry::names_of(Kind::Layout)
        ));
    };
    let last = stages.len() - 1;
    for (i, s) in stages.iter().enumerate() {
        let ok = if i < layout_at {
            s.kinds.contains(&Kind::Layer)
        } else if i == layout_at {
            true
        } else if i == last {
            s.kinds.contains(&Kind::Store)
        } else {
            s.kinds.contains(&Kind::StoreWrapper)
        };
        if ok {
            continue;
        }
        let why = if s.kinds.contains(&Kind::Layout) {
            format!(
                "only one layout is allowed, but {:?} follows {:?}",
                s.name, stages[layout_at].name
            )
        } else if i < layout_at {
            format!(
                "{:?} cannot stand above the layout {:?}: only block layers ({}) can",
                s.name,
                stages[layout_at].name,
                registry::names_of(Kind::Layer)
            )
        } else if s.kinds.contains(&Kind::Store) && i != last {
            format!("the store {:?} must be the last stage", s.name)
        } else if i == last {
            format!(
                "the pipeline must end with a store (one of {}), not {:?}",
                registry::names_of(Kind::Store),
                s.name
            )
        } else {
            format!(
                "{:?} cannot stand between the layout and the store: only store wrappers ({}) can",
                s.name,
                registry::names_of(Kind::StoreWrapper)
            )
        };
        return Err(format!("pipeline {text:?}: {why}"));
    }
    if layout_at == last {
        return Err(format!(
            "pipeline {text:?} has no store: it must end with one of {}",
            registry::names_of(Kind::Store)
        ));
    }
    let p = Pipeline {
        layers: names[..layout_at].iter().map(|s| s.to_string()).collect(),
        layout: names[layout_at].to_string(),
        wrappers: names[layout_at + 1..last]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        store: names[last].to_string(),
    };
    if p.layout == "raw" && !matches!(p.store.as_str(), "memory" | "file") {
        return Err(format!(
            "pipeline {text:?}: raw serves memory or file; put a sharded layout over {:?}",
            p.store
        ));
    }
    if p.layout == "raw" && !p.wrappers.is_empty() {
        return Err(format!(
            "pipeline {text:?}: raw serves its store directly; put store wrappers under sharded, or the layers above raw"
        ));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_pipelines() {
        let p = parse("cache -> retry -> sharded -> retry2").unwrap_err();
        assert!(p.contains("unknown stage \"retry2\""), "{p}");
        let p = parse("cache -> retry -> sharded -> fault -> file").unwrap();
        assert_eq!(p.layers, vec!["cache", "retry"]);
        assert_eq!(p.layout, "sharded");
        assert_eq!(p.wrappers, vec!["fault"]);
        assert_eq!(p.store, "file");
        assert_eq!(p.to_string(), "cache -> retry -> sharded -> fault -> file");
        assert_eq!(parse("raw->memory").unwrap().to_string(), "raw -> memory");
    }

    #[test]
    fn every_rule_has_its_message() {
        let cases = [
            (
                "raw",
                "pipeline \"raw\" has no store: it must end with one of memory, file, s3",
            ),
            (
                "memory",
                "pipeline \"memory\" has no layout: exactly one of raw, sharded must stand above the store",
            ),
            (
                "raw -> sharded -> file",
                "pipeline \"raw -> sharded -> file\": only one layout is allowed, but \"sharded\" follows \"raw\"",
            ),
            (
                "sharded -> file -> retry",
                "pipeline \"sharded -> file -> retry\": the store \"file\" must be the last stage",
            ),
            (
                "sharded -> cache -> file",
                "pipeline \"sharded -> cache -> file\": \"cache\" cannot stand between the layout and the store: only store wrappers (retry, fault) can",
            ),
            (
                "file -> sharded -> memory",
                "pipeline \"file -> sharded -> memory\": \"file\" cannot stand above the layout \"sharded\": only block layers (cache, retry, fault) can",
            ),
            (
                "sharded -> retry",
                "pipeline \"sharded -> retry\": the pipeline must end with a store (one of memory, file, s3), not \"retry\"",
            ),
            (
                "retry -> raw -> retry -> file",
                "pipeline \"retry -> raw -> retry -> file\": stage \"retry\" appears twice",
            ),
            (
                "raw -> fault -> file",
                "pipeline \"raw -> fault -> file\": raw serves its store directly; put store wrappers under sharded, or the layers above raw",
            ),
            (
                "raw -> s3",
                "pipeline \"raw -> s3\": raw serves memory or file; put a sharded layout over \"s3\"",
            ),
            (
                "raw -> -> file",
                "pipeline \"raw -> -> file\" has an empty stage: write stages separated by \"->\", like \"cache -> sharded -> file\"",
            ),
        ];
        for (text, msg) in cases {
            assert_eq!(parse(text).unwrap_err(), msg);
        }
    }
}
