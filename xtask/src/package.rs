//! `cargo xtask package [--release]`: the Debian packages of `ftd` and `ft-arbiter`
//! (cargo-deb), with their man pages and shell completions rendered from the command
//! lines' own definitions (clap_mangen, clap_complete) into `target/dist` first.
//!
//! `./x test` packages the debug build (a test installs the packages in the testbed and
//! runs the appliance from them); an operator's packages come from `--release`. The
//! .deb files land in `target/debian/`.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::{cargo, root, run};

pub fn package(release: bool) -> Result<Vec<PathBuf>> {
    run(cargo()
        .arg("build")
        .args(release.then_some("--release"))
        .args(["--bins", "-p", "ftd", "-p", "ft-fence"]))?;
    let dist = root().join("target/dist");
    render_docs(&dist)?;
    // The built-in guest, shipped beside the binary too: the package keeps every guest
    // it shipped (postinst), for configs that pin theirs (vm.image_sha256).
    std::fs::write(dist.join("guest.elf"), ft_vmm::GUEST_ELF)?;
    let out = root().join("target/debian");
    std::fs::create_dir_all(&out)?;
    let mut debs = Vec::new();
    for (pkg, name) in [("ftd", "ftd"), ("ft-fence", "ft-arbiter")] {
        let deb = out.join(format!("{name}.deb"));
        let mut cmd = cargo();
        cmd.args(["deb", "--no-build", "-p", pkg, "-o"]).arg(&deb);
        if !release {
            // The debug build: unstripped and fast to compress (a test artifact).
            cmd.args(["--profile", "dev", "--fast", "--no-strip"]);
        }
        run(&mut cmd)?;
        eprintln!("package: {}", deb.display());
        debs.push(deb);
    }
    Ok(debs)
}

/// Man pages (one per command and subcommand) and completion scripts.
fn render_docs(dist: &Path) -> Result<()> {
    let man = dist.join("man");
    let comp = dist.join("completions");
    for d in [&man, &comp] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let ftd = ftd::cli::Cli::command().name("ftd");
    clap_mangen::generate_to(ftd.clone(), &man).context("rendering ftd's man pages")?;
    let arbiter = ft_fence::cli::Args::command().name("ft-arbiter");
    clap_mangen::generate_to(arbiter.clone(), &man).context("rendering ft-arbiter's man page")?;
    use clap_complete::Shell;
    for (shell, file) in [
        (Shell::Bash, "ftd.bash"),
        (Shell::Zsh, "_ftd"),
        (Shell::Fish, "ftd.fish"),
    ] {
        let mut f = std::fs::File::create(comp.join(file))?;
        clap_complete::generate(shell, &mut ftd.clone(), "ftd", &mut f);
    }
    let mut f = std::fs::File::create(comp.join("ft-arbiter.bash"))?;
    clap_complete::generate(Shell::Bash, &mut arbiter.clone(), "ft-arbiter", &mut f);
    Ok(())
}
