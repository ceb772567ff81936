//! The shipped example configuration parses, sets every key there is, and holds the defaults.

use thinstack::Config;

const EXAMPLE: &str = include_str!("../configs/thinstack.toml");

/// Every dotted key path of a TOML table.
fn keys(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (key, value) in table {
        let path = format!("{prefix}{key}");
        match value {
            toml::Value::Table(inner) => keys(inner, &format!("{path}."), out),
            _ => out.push(path),
        }
    }
}

#[test]
fn example_config_parses_to_the_defaults() {
    let parsed = Config::parse(EXAMPLE, "configs/thinstack.toml").unwrap();
    assert_eq!(parsed, Config::default());
}

#[test]
fn example_config_shows_every_key() {
    let effective: toml::Table = toml::from_str(&Config::default().to_toml()).unwrap();
    let example: toml::Table = toml::from_str(EXAMPLE).unwrap();
    let (mut all, mut shown) = (Vec::new(), Vec::new());
    keys(&effective, "", &mut all);
    keys(&example, "", &mut shown);
    all.sort();
    shown.sort();
    assert_eq!(all, shown, "configs/thinstack.toml must show every key");
}

#[test]
fn check_config_prints_the_effective_config_and_refuses_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[pool]\nblock_size = \"128K\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thinstackd"))
        .args(["--config", good.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("block_size = \"128K\""), "{text}");
    assert!(text.contains("data_size = \"100G\""), "{text}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[layers]\nbase_size = \"ten gigs\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thinstackd"))
        .args(["--config", bad.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("line 2, column 13") && err.contains("layers.base_size"),
        "{err}"
    );
}

/// The shipped systemd unit passes `systemd-analyze verify` (with ExecStart pointing at the
/// thinstackd just built; scripts/setup installs systemd).
#[test]
fn the_systemd_unit_verifies() {
    let unit = include_str!("../configs/thinstackd.service");
    assert!(
        unit.contains("Type=notify"),
        "thinstackd tells systemd when it is ready"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("thinstackd.service");
    let unit = unit.replace(
        "/usr/local/bin/thinstackd",
        env!("CARGO_BIN_EXE_thinstackd"),
    );
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (scripts/setup installs systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    assert!(
        !err.contains("thinstackd.service:"),
        "warnings about the unit: {err}"
    );
}
