//! The packaging's inputs stay in step with the tree: every file that Cargo.toml's package
//! metadata ships exists, both packages ship every unit in `systemd/`, and the maintainer
//! scripts parse. Building and installing the packages is `packaging/test-packages.sh`'s job
//! (minutes, and root).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn metadata(which: &str) -> toml::Table {
    let text = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let manifest: toml::Table = toml::from_str(&text).unwrap();
    manifest["package"]["metadata"][which]
        .as_table()
        .unwrap_or_else(|| panic!("Cargo.toml has no [package.metadata.{which}]"))
        .clone()
}

/// (source, destination) of every asset of the .deb.
fn deb_assets() -> Vec<(String, String)> {
    metadata("deb")["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_array().expect("deb assets are [source, dest, mode]");
            (
                a[0].as_str().unwrap().to_owned(),
                a[1].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// (source, destination) of every asset of the .rpm.
fn rpm_assets() -> Vec<(String, String)> {
    metadata("generate-rpm")["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["source"].as_str().unwrap().to_owned(),
                a["dest"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Files matching `dir/*suffix` or the one file `path`, relative to the crate.
fn matches(pattern: &str) -> Vec<PathBuf> {
    match pattern.split_once('*') {
        None => {
            let p = root().join(pattern);
            if p.is_file() { vec![p] } else { vec![] }
        }
        Some((dir, suffix)) => std::fs::read_dir(root().join(dir))
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file() && p.to_string_lossy().ends_with(suffix))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[test]
fn every_shipped_source_file_exists() {
    // Files under target/ are built by packaging/build-packages.sh.
    for (source, _) in deb_assets().into_iter().chain(rpm_assets()) {
        if source.starts_with("target/") {
            continue;
        }
        assert!(
            !matches(&source).is_empty(),
            "Cargo.toml ships {source}, which matches no file"
        );
    }
    let rpm = metadata("generate-rpm");
    for key in [
        "post_install_script",
        "pre_uninstall_script",
        "post_uninstall_script",
    ] {
        let path = rpm[key].as_str().unwrap();
        assert!(root().join(path).is_file(), "{key} = {path:?} is missing");
    }
    let scripts = metadata("deb")["maintainer-scripts"]
        .as_str()
        .unwrap()
        .to_owned();
    for s in ["postinst", "prerm", "postrm"] {
        assert!(
            root().join(&scripts).join(s).is_file(),
            "{scripts}{s} is missing"
        );
    }
}

#[test]
fn both_packages_ship_every_unit_and_the_config() {
    let units: Vec<String> = std::fs::read_dir(root().join("systemd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(units.iter().any(|u| u == "nbd-rs.service"));
    for unit in &units {
        let src = format!("systemd/{unit}");
        assert!(
            deb_assets()
                .iter()
                .any(|(s, d)| *s == src && d == "lib/systemd/system/"),
            "the .deb does not ship {src} into /lib/systemd/system"
        );
        assert!(
            rpm_assets()
                .iter()
                .any(|(s, d)| *s == src && *d == format!("/usr/lib/systemd/system/{unit}")),
            "the .rpm does not ship {src} into /usr/lib/systemd/system"
        );
    }
    assert!(
        deb_assets()
            .iter()
            .any(|(s, d)| s == "config/nbd-rs.toml" && d == "etc/nbd-rs.toml")
    );
    let rpm_config = metadata("generate-rpm")["assets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["dest"].as_str() == Some("/etc/nbd-rs.toml"))
        .cloned()
        .expect("the .rpm ships /etc/nbd-rs.toml");
    assert_eq!(rpm_config["config"].as_str(), Some("noreplace"));
}

#[test]
fn maintainer_scripts_parse() {
    let mut scripts: Vec<PathBuf> = ["postinst", "prerm", "postrm"]
        .iter()
        .map(|s| root().join("packaging/debian").join(s))
        .collect();
    scripts.extend(matches("packaging/rpm/*.sh"));
    scripts.push(root().join("packaging/build-packages.sh"));
    scripts.push(root().join("packaging/test-packages.sh"));
    for script in &scripts {
        let shell = if script.extension().is_some_and(|e| e == "sh") && is_bash(script) {
            "bash"
        } else {
            "sh"
        };
        let out = Command::new(shell).arg("-n").arg(script).output().unwrap();
        assert!(
            out.status.success(),
            "{shell} -n {}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn is_bash(script: &Path) -> bool {
    std::fs::read_to_string(script).is_ok_and(|t| t.starts_with("#!/usr/bin/env bash"))
}
