//! Every command's `-h` and `--help`, as a user runs them, fit a 100-column, 40-line
//! screen: one line per flag, with its default; details live in docs/.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_splitserve");

fn help(path: &[String], flag: &str) -> String {
    let out = Command::new(BIN)
        .args(path)
        .arg(flag)
        .output()
        .expect("run splitserve");
    assert!(out.status.success(), "{path:?} {flag} failed");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

/// The subcommand names listed under "Commands:" (clap's own `help` left out).
fn subcommands(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_help_fits_a_screen_and_names_its_defaults() {
    let mut todo = vec![Vec::<String>::new()];
    let mut seen = 0;
    let mut bad = Vec::new();
    while let Some(path) = todo.pop() {
        let short = help(&path, "-h");
        let long = help(&path, "--help");
        let name = format!("splitserve {}", path.join(" "));
        // No flag hides a longer text behind --help: both show the one screen.
        if short != long {
            bad.push(format!("`{name}`: -h and --help differ"));
        }
        let lines = long.trim_end().lines().count();
        let widest = long.lines().map(|l| l.chars().count()).max().unwrap_or(0);
        if lines > 40 || widest > 100 {
            bad.push(format!("`{name} --help`: {lines} lines, {widest} columns"));
        }
        // A flag line with no help text at all tells the user nothing but its name.
        for l in long.lines().filter(|l| l.starts_with("      --")) {
            if !l.trim().contains("  ") {
                bad.push(format!("`{name}`: no help for `{}`", l.trim()));
            }
        }
        for sub in subcommands(&long) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
        seen += 1;
    }
    // The root, econ and bench groups, and every command below them.
    assert!(seen >= 20, "only {seen} help screens found");
    assert!(bad.is_empty(), "help screens:\n{}", bad.join("\n"));
}

#[test]
fn defaults_are_shown() {
    let up = help(&["up".to_string()], "--help");
    for want in [
        "--port <PORT>",
        "[default: 8000]",
        "--prefill-policy <POLICY>",
        "[default: least_load]",
        "--decode-policy <POLICY>",
        "[default: free_blocks]",
        "--num-kv-blocks <N>",
        "[default: 2048]",
    ] {
        assert!(up.contains(want), "`up --help` lacks {want}:\n{up}");
    }
}
