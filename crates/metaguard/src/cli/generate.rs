//! `metaguard __generate man|completions DIR` (hidden): writes the man
//! pages (`metaguard.8`, one `metaguard-<sub>.8` per subcommand) or the
//! bash/zsh/fish completions, generated from the clap definition so they
//! never drift from the command line. `scripts/package` runs it before
//! `cargo deb`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::CommandFactory as _;

use super::Cli;

/// What to generate.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Asset {
    /// Man pages, section 8.
    Man,
    /// bash, zsh and fish completions.
    Completions,
}

pub fn run(asset: Asset, dir: &Path) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let written = match asset {
        Asset::Man => man(dir)?,
        Asset::Completions => completions(dir)?,
    };
    for p in written {
        println!("{}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

fn man(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let cmd = Cli::command();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut buf)?;
    let p = dir.join("metaguard.8");
    write(&p, &buf)?;
    out.push(p);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("metaguard-{}", sub.get_name());
        let sub = sub
            .clone()
            .name(name.clone())
            .bin_name(format!("metaguard {}", sub.get_name()))
            .version(cmd.get_version().unwrap_or_default().to_string());
        let mut buf = Vec::new();
        clap_mangen::Man::new(sub).section("8").render(&mut buf)?;
        let p = dir.join(format!("{name}.8"));
        write(&p, &buf)?;
        out.push(p);
    }
    Ok(out)
}

fn completions(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    use clap_complete::Shell;
    let mut out = Vec::new();
    for (shell, file) in [
        (Shell::Bash, "metaguard.bash"),
        (Shell::Zsh, "_metaguard"),
        (Shell::Fish, "metaguard.fish"),
    ] {
        let mut cmd = Cli::command();
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, "metaguard", &mut buf);
        let p = dir.join(file);
        write(&p, &buf)?;
        out.push(p);
    }
    Ok(out)
}
