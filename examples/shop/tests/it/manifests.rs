//! Every container of the Kubernetes manifests (`examples/shop/deploy/k8s/`) that runs the
//! shop's image runs a command this binary accepts, checked with `shop --check`. The image
//! is built with `real-servers` (its Dockerfile's default, checked by micro-tests'
//! `deploy` tests), and so is this binary when the test runs the manifests' commands.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml_ng::Value;

/// The image's entry point (`ENTRYPOINT ["shop"]`), and where the binary is in it.
const ENTRYPOINT: [&str; 2] = ["shop", "/usr/local/bin/shop"];

/// Where a container is, and the words it runs after the entry point (or why they can't
/// be the shop's).
type Found = (String, Result<Vec<String>, String>);

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s")
}

/// What each container running the shop's image executes, after the entry point, with
/// where it is: `command` (replacing the entry point) then `args`, as Kubernetes runs
/// them. A `command` that does not start the shop is an error.
fn manifest_commands() -> Vec<Found> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(k8s_dir())
        .expect("examples/shop/deploy/k8s")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut commands = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        commands.extend(commands_in(&name, &text));
    }
    commands
}

/// The commands of the containers in one manifest file.
fn commands_in(name: &str, text: &str) -> Vec<Found> {
    let mut commands = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Value::deserialize(document)
            .unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"));
        let at = format!(
            "{name}: {} {}",
            str_of(&value["kind"]),
            str_of(&value["metadata"]["name"])
        );
        containers(&value, &at, &mut commands);
    }
    commands
}

/// Walks `value` for pod specs' `containers` and `initContainers`, whatever the kind.
fn containers(value: &Value, at: &str, out: &mut Vec<Found>) {
    let Some(mapping) = value.as_mapping() else {
        if let Some(sequence) = value.as_sequence() {
            sequence.iter().for_each(|v| containers(v, at, out));
        }
        return;
    };
    for (key, child) in mapping {
        let is_containers = key == "containers" || key == "initContainers";
        match child.as_sequence() {
            Some(list) if is_containers => {
                for container in list {
                    if let Some(command) = container_command(container) {
                        let at = format!("{at}, container {}", str_of(&container["name"]));
                        out.push((at, command));
                    }
                }
            }
            _ => containers(child, at, out),
        }
    }
}

/// The words after the entry point, for a container of the shop's image; `None` for
/// another image.
fn container_command(container: &Value) -> Option<Result<Vec<String>, String>> {
    (image_name(&str_of(&container["image"])) == "shop").then(|| argv(container))
}

/// `registry.example:5000/team/shop:0.1.0@sha256:...` is `shop`.
fn image_name(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or_default();
    let path = image.rsplit('/').next().unwrap_or_default();
    path.split(':').next().unwrap_or_default()
}

/// `command` (whose first word replaces the entry point, so must be the shop) then `args`.
fn argv(container: &Value) -> Result<Vec<String>, String> {
    let words = |field: &str| -> Result<Vec<String>, String> {
        match &container[field] {
            Value::Null => Ok(Vec::new()),
            value => serde_yaml_ng::from_value(value.clone())
                .map_err(|e| format!("`{field}` is not a list of strings: {e}")),
        }
    };
    let mut argv = Vec::new();
    if let Some((program, rest)) = words("command")?.split_first() {
        if !ENTRYPOINT.contains(&program.as_str()) {
            return Err(format!("`command` runs {program}, not the shop"));
        }
        argv.extend_from_slice(rest);
    }
    argv.extend(words("args")?);
    Ok(argv)
}

fn str_of(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

/// `shop --check <argv>`: `Ok` with its output when the binary accepts the command.
fn check(argv: &[String]) -> Result<String, String> {
    let output = Command::new(env!("CARGO_BIN_EXE_shop"))
        .arg("--check")
        .args(argv)
        .output()
        .expect("the shop binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{} {stderr}", output.status))
    }
}

/// Every refusal, one line each; empty when the binary accepts every command.
fn refused(commands: &[Found]) -> Vec<String> {
    commands
        .iter()
        .filter_map(|(at, argv)| {
            let argv = match argv {
                Ok(argv) => argv,
                Err(problem) => return Some(format!("{at}: {problem}")),
            };
            check(argv)
                .err()
                .map(|error| format!("{at}: `shop {}` is refused: {error}", argv.join(" ")))
        })
        .collect()
}

#[cfg(feature = "real-servers")]
#[test]
fn the_binary_accepts_every_command_of_the_manifests() {
    let commands = manifest_commands();
    let serves = commands
        .iter()
        .filter(|(_, argv)| {
            argv.as_ref()
                .is_ok_and(|a| a.first().is_some_and(|w| w == "serve"))
        })
        .count();
    assert_eq!(serves, 8, "one `serve` per service: {commands:#?}");
    let refused = refused(&commands);
    assert!(refused.is_empty(), "{}", refused.join("\n"));
}

#[test]
fn a_command_the_binary_refuses_fails_the_check() {
    let words = |w: &[&str]| Ok(w.iter().map(|s| s.to_string()).collect());
    let commands = [
        ("a misspelt service".to_owned(), words(&["serve", "users"])),
        ("a misspelt verb".to_owned(), words(&["server", "gateway"])),
        (
            "a stray word".to_owned(),
            words(&["serve", "gateway", "now"]),
        ),
        (
            "a bad option".to_owned(),
            words(&["loadgen", "--users", "many"]),
        ),
    ];
    let found = refused(&commands);
    assert_eq!(found.len(), commands.len(), "{found:#?}");
    assert!(
        found[0].contains("there is no service `users`"),
        "{found:#?}"
    );
    assert!(check(&["loadgen".to_owned(), "--smoke".to_owned()]).is_ok());

    // The same through a manifest, as the test above reads them.
    let text = std::fs::read_to_string(k8s_dir().join("20-gateway.yaml")).unwrap();
    let text = text.replace(
        r#"args: ["serve", "gateway"]"#,
        r#"args: ["serve", "gateways"]"#,
    );
    let found = refused(&commands_in("20-gateway.yaml", &text));
    assert!(
        found.len() == 1
            && found[0].starts_with("20-gateway.yaml: Deployment gateway, container gateway:")
            && found[0].contains("`shop serve gateways` is refused"),
        "{found:#?}"
    );
}

#[test]
fn a_command_that_replaces_the_entry_point_is_read_as_kubernetes_runs_it() {
    let container: Value = serde_yaml_ng::from_str(
        "{name: x, image: registry.example/shop:1, command: [/usr/local/bin/shop, serve], \
          args: [gateway]}",
    )
    .unwrap();
    assert_eq!(
        container_command(&container),
        Some(Ok(vec!["serve".to_owned(), "gateway".to_owned()]))
    );
    let container: Value =
        serde_yaml_ng::from_str("{name: x, image: shop:1, command: [sh, -c, 'shop serve user']}")
            .unwrap();
    assert_eq!(
        container_command(&container),
        Some(Err("`command` runs sh, not the shop".to_owned()))
    );
    let container: Value = serde_yaml_ng::from_str("{name: x, image: postgres:17}").unwrap();
    assert_eq!(container_command(&container), None);
    assert_eq!(
        image_name("registry.example:5000/team/shop:0.1.0@sha256:ab"),
        "shop"
    );
    assert_eq!(image_name("shop"), "shop");
    assert_eq!(image_name("registry.example:5000/shopfront:1"), "shopfront");
}

/// Without `real-servers` the binary refuses every command of the manifests, which is
/// why the image is built with it.
#[cfg(not(feature = "real-servers"))]
#[test]
fn without_real_servers_the_binary_refuses_the_manifests() {
    let commands = manifest_commands();
    let found = refused(&commands);
    assert_eq!(found.len(), 8, "{found:#?}");
    for refusal in found {
        assert!(refusal.contains("--features real-servers"), "{refusal}");
    }
}
