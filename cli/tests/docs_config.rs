//! The configuration table (docs/configuration.md) lists exactly the
//! settings the code has, with the code's defaults.

use std::collections::BTreeMap;

use pagestream::Config;

fn code_settings() -> BTreeMap<String, toml::Value> {
    let table = toml::Value::try_from(Config::default()).unwrap();
    let mut out = BTreeMap::new();
    for (section, values) in table.as_table().unwrap() {
        for (key, value) in values.as_table().unwrap() {
            out.insert(format!("PAGESTREAM_{}_{}", section.to_uppercase(), key.to_uppercase()), value.clone());
        }
    }
    out
}

fn documented_settings() -> BTreeMap<String, String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md")).unwrap();
    doc.lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix("`PAGESTREAM_")?.strip_suffix('`')?;
            Some((format!("PAGESTREAM_{name}"), cells.get(2)?.to_string()))
        })
        .collect()
}

#[test]
fn docs_config_table_matches_the_code() {
    let code = code_settings();
    let documented = documented_settings();
    let missing: Vec<_> = code.keys().filter(|k| !documented.contains_key(*k)).collect();
    let extra: Vec<_> = documented.keys().filter(|k| !code.contains_key(*k)).collect();
    assert!(missing.is_empty(), "settings missing from the table in docs/configuration.md: {missing:?}");
    assert!(extra.is_empty(), "docs/configuration.md lists settings the code does not have: {extra:?}");
    for (name, default) in &code {
        let doc = &documented[name];
        // Literal defaults are shown in backticks; computed ones (paths) in words.
        let Some(lit) = doc.strip_prefix('`').and_then(|d| d.strip_suffix('`')) else { continue };
        if lit.contains('<') {
            continue;
        }
        let shown = match default {
            toml::Value::String(s) => s.clone(),
            toml::Value::Float(f) if f.fract() == 0.0 => format!("{f:.0}"),
            other => other.to_string(),
        };
        assert_eq!(lit, shown, "{name}: docs/configuration.md says `{lit}`, the code's default is {shown}");
    }
}
