//! `vm-test`: the VM harness's driver (run through `cargo xtask vm-test`, `image`, `demo`).
//!
//! ```text
//! vm-test run   --bins DIR --cache DIR --work DIR [--parallel N] [SCENARIO…]
//! vm-test list
//! vm-test image --bins DIR --cache DIR --policy FILE [--bundle DIR --at PATH] [--module M]… --out FILE
//! vm-test demo  --bins DIR --cache DIR --work DIR
//! vm-test bench --bins DIR --cache DIR --work DIR [--boots N]
//! vm-test relay HOST:PORT DELAY_MS     (QEMU's guestfwd runs this per connection)
//! vm-test sink FILE                    (the outbound sink guestfwd)
//! ```

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use cvm_warden_vm::assets::Assets;
use cvm_warden_vm::scenario::{self, Ctx};
use cvm_warden_vm::{image, Bins};

fn main() {
    if let Err(error) = run() {
        eprintln!("vm-test: error: {error:#}");
        std::process::exit(1);
    }
}

struct Flags {
    words: Vec<String>,
    values: Vec<(String, String)>,
}

impl Flags {
    fn parse(args: &[String]) -> Flags {
        let mut words = Vec::new();
        let mut values = Vec::new();
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            if let Some(flag) = arg.strip_prefix("--") {
                values.push((flag.to_string(), iter.next().cloned().unwrap_or_default()));
            } else {
                words.push(arg.clone());
            }
        }
        Flags { words, values }
    }

    fn get(&self, flag: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(f, _)| f == flag)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, flag: &str) -> Vec<String> {
        self.values
            .iter()
            .filter(|(f, _)| f == flag)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn path(&self, flag: &str) -> Result<PathBuf> {
        self.get(flag)
            .map(PathBuf::from)
            .with_context(|| format!("--{flag} is required"))
    }

    fn ctx(&self) -> Result<Ctx> {
        let cache = self.path("cache")?;
        let assets = Assets::ensure(&cache)?;
        let cache = std::fs::canonicalize(&cache)?;
        let bins = Bins::in_dir(&self.path("bins")?)?;
        let work = self.path("work")?;
        std::fs::create_dir_all(&work)?;
        let work = std::fs::canonicalize(&work)?;
        Ok(Ctx {
            assets,
            bins,
            work,
            cache,
        })
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        bail!("usage: vm-test run|list|image|demo|bench|relay|sink …");
    };
    match command.as_str() {
        "relay" => {
            let target = rest.first().context("relay needs HOST:PORT")?;
            let delay = rest.get(1).and_then(|d| d.parse().ok()).unwrap_or(0);
            cvm_warden_vm::relay(target, delay)
        }
        "sink" => cvm_warden_vm::sink(&PathBuf::from(rest.first().context("sink needs FILE")?)),
        "list" => {
            for s in scenario::all() {
                println!("{:<28} {}", s.name, s.what);
            }
            Ok(())
        }
        "run" => {
            let flags = Flags::parse(rest);
            let ctx = flags.ctx()?;
            let parallel = flags
                .get("parallel")
                .and_then(|p| p.parse().ok())
                .unwrap_or(2usize)
                .min(2);
            let all = scenario::all();
            let chosen: Vec<_> = if flags.words.is_empty() {
                all
            } else {
                let mut chosen = Vec::new();
                for name in &flags.words {
                    match all.iter().find(|s| s.name == name) {
                        Some(s) => chosen.push(*s),
                        None => {
                            bail!("no scenario {name:?}; `cargo xtask vm-test --list` lists them")
                        }
                    }
                }
                chosen
            };
            println!(
                "vm-test: {} scenario(s), at most {parallel} VMs at once, kernel {}",
                chosen.len(),
                ctx.assets.kver
            );
            let failed = scenario::run_all(&ctx, &chosen, parallel);
            println!("vm-test: {} passed, {failed} failed", chosen.len() - failed);
            if failed > 0 {
                bail!("{failed} VM scenario(s) failed");
            }
            Ok(())
        }
        "image" => {
            let flags = Flags::parse(rest);
            let out = flags.path("out")?;
            let Some(policy) = flags.get("policy") else {
                // The demo CVM's image (its policy, the probe bundle, passwd and group).
                let ctx = flags.ctx()?;
                let site = scenario::Site::new(&ctx, &ctx.work.join("image"))?;
                let built = site.image(&ctx, &scenario::Guest::default(), "image")?;
                std::fs::copy(&built.path, &out)?;
                println!("{}", image::Image { path: out, ..built }.summary());
                return Ok(());
            };
            let assets = Assets::ensure(&flags.path("cache")?)?;
            let bins = Bins::in_dir(&flags.path("bins")?)?;
            let policy = std::fs::read_to_string(policy)?;
            let mut spec = image::ImageSpec {
                warden: bins.warden.clone(),
                policy,
                modules: flags.all("module"),
                ..Default::default()
            };
            if let Some(bundle) = flags.get("bundle") {
                let at = flags.get("at").context("--bundle needs --at GUEST_PATH")?;
                spec.trees.push((PathBuf::from(bundle), at.to_string()));
            }
            let built = image::build(&assets, &spec, &out)?;
            println!("{}", built.summary());
            Ok(())
        }
        "demo" => {
            let flags = Flags::parse(rest);
            cvm_warden_vm::demo::run(&flags.ctx()?)
        }
        "bench" => {
            let flags = Flags::parse(rest);
            let boots = flags.get("boots").and_then(|b| b.parse().ok()).unwrap_or(3);
            cvm_warden_vm::bench::run(&flags.ctx()?, boots)
        }
        other => bail!("unknown command {other:?}"),
    }
}
