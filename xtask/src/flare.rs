//! `cargo xtask flare`: a real NVIDIA FLARE federation behind cvm-warden.
//!
//! `nvflare` (PyPI) in a virtual environment, a project provisioned by `nvflare provision`
//! with one server and two clients, each site booted by `cvm-warden init --sandbox` as PID 1
//! of its own PID/mount/UTS namespaces inside its own network namespace (veth pairs to a
//! router namespace, as separate machines would be), each with its own swtpm and an attested
//! boot against the test broker. The sites' TLS private keys are not in their bundles: the
//! model owner registers each as a broker resource bound to that site's PCR 15, and the
//! broker releases it into the site's secrets tmpfs. A hello-numpy job submitted through
//! FLARE's admin API must complete with both clients contributing; during the run a
//! connection to a port a client never allowed is refused; the three audit logs verify.
//! Then the same job runs in the same namespaces without cvm-warden, and the two job wall
//! times give the overhead figure.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::sandbox::{
    audit_verify_attested, build_bins, json_of, provision_ak, spawn_boot, wait_until, Bins, Broker,
    Netns, Swtpm, AK_HANDLE, TPM_PORT,
};
use crate::{ensure_tools, is_root, sh, show, TOOLS};

/// Everything the run writes (world-readable: the sites' workload user reads its bundle and
/// the virtual environment).
const FLARE_DIR: &str = "/var/lib/cvm-warden-flare";
/// The FLARE release the federation runs.
const NVFLARE: &str = "2.9.0";
/// The project name `nvflare provision` gets.
const PROJECT: &str = "cvmwarden";
/// The project admin (its kit submits the job).
const ADMIN: &str = "admin@nvidia.com";
/// The broker's namespace, address and port.
const KBS_NS: &str = "cvm-flare-kbs";
const KBS_ADDR: &str = "10.99.9.2";
const KBS_PORT: u16 = 18999;
/// The router between the sites (no cvm-warden runs there).
const HUB_NS: &str = "cvm-flare-hub";
/// A port site-1 never allows, with a listener behind it during the run.
const CLOSED_PORT: u16 = 9999;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Server,
    Client,
}

/// One FLARE participant and its network place.
struct Site {
    name: &'static str,
    role: Role,
    netns: &'static str,
    /// Its address; the router is `.1` of the same /24.
    addr: &'static str,
    /// The router's end of its veth pair.
    hub_if: &'static str,
}

const SERVER_ADDR: &str = "10.99.0.2";
const CLIENT_SUBNETS: [&str; 2] = ["10.99.1.0/24", "10.99.2.0/24"];

const SITES: [Site; 3] = [
    Site {
        name: "server1",
        role: Role::Server,
        netns: "cvm-flare-server1",
        addr: SERVER_ADDR,
        hub_if: "h-server1",
    },
    Site {
        name: "site-1",
        role: Role::Client,
        netns: "cvm-flare-site-1",
        addr: "10.99.1.2",
        hub_if: "h-site-1",
    },
    Site {
        name: "site-2",
        role: Role::Client,
        netns: "cvm-flare-site-2",
        addr: "10.99.2.2",
        hub_if: "h-site-2",
    },
];

impl Site {
    fn hub_addr(&self) -> String {
        let mut parts: Vec<&str> = self.addr.split('.').collect();
        parts.pop();
        format!("{}.1", parts.join("."))
    }

    /// The key file name in the kit and in the secrets tmpfs.
    fn key_name(&self) -> &'static str {
        match self.role {
            Role::Server => "server.key",
            Role::Client => "client.key",
        }
    }

    fn resource(&self) -> String {
        format!("flare/{}/tls-key", self.name)
    }
}

pub(crate) fn run(root: &Path) -> Result<()> {
    if !is_root() {
        bail!("cargo xtask flare needs root (network namespaces, nftables, PID 1 in a sandbox)");
    }
    ensure_tools(TOOLS)?;
    ensure_tools(&[("openssl", "openssl"), ("setpriv", "util-linux")])?;
    let bins = build_bins(root)?;
    let base = Path::new(FLARE_DIR);
    fs::create_dir_all(base)?;
    set_mode(base, 0o755)?;
    let python = venv(base)?;
    let run = base.join("run");
    if run.exists() {
        fs::remove_dir_all(&run).with_context(|| format!("removing {}", run.display()))?;
    }
    fs::create_dir_all(&run)?;
    let kits = provision(&python, &run)?;
    let net = Network::create()?;
    let result = federation(root, &bins, &python, &run, &kits, &net);
    drop(net);
    result
}

/// The virtual environment with `nvflare` (kept between runs when it has the right
/// release); returns its python.
fn venv(base: &Path) -> Result<PathBuf> {
    let venv = base.join("venv");
    let python = venv.join("bin/python3");
    let version = Command::new(&python)
        .args(["-c", "import nvflare; print(nvflare.__version__)"])
        .output();
    if version
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == NVFLARE)
    {
        return Ok(python);
    }
    banner(&format!(
        "installing nvflare {NVFLARE} from PyPI into {}",
        venv.display()
    ));
    if venv.exists() {
        fs::remove_dir_all(&venv)?;
    }
    // Debian's python, so the unprivileged workload user can run it.
    let make = || {
        Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !make() {
        sh(Command::new("apt-get").args(["install", "-y", "python3-venv"]))?;
        ensure!(
            make(),
            "python3 -m venv {} failed even with python3-venv installed",
            venv.display()
        );
    }
    sh(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("nvflare=={NVFLARE}"),
    ]))?;
    // The workload user cannot write __pycache__ into the environment: compile it now.
    sh(Command::new(&python)
        .args(["-m", "compileall", "-q"])
        .arg(venv.join("lib")))?;
    Ok(python)
}

/// `nvflare provision` of a project with one server, two clients and the admin; returns
/// the folder holding each participant's kit.
fn provision(python: &Path, run: &Path) -> Result<PathBuf> {
    banner("project admin: nvflare provision (one server, two clients, an admin)");
    let project = run.join("project.yml");
    let mut yml = format!(
        "api_version: 3\nname: {PROJECT}\ndescription: cvm-warden federation\nparticipants:\n  - name: server1\n    type: server\n    org: nvidia\n    fed_learn_port: 8002\n    admin_port: 8003\n    default_host: {SERVER_ADDR}\n"
    );
    for site in SITES.iter().filter(|s| s.role == Role::Client) {
        yml.push_str(&format!(
            "  - name: {}\n    type: client\n    org: nvidia\n",
            site.name
        ));
    }
    yml.push_str(&format!(
        "  - name: {ADMIN}\n    type: admin\n    org: nvidia\n    role: project_admin\nbuilders:\n  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder\n  - path: nvflare.lighter.impl.static_file.StaticFileBuilder\n    args:\n      config_folder: config\n  - path: nvflare.lighter.impl.cert.CertBuilder\n  - path: nvflare.lighter.impl.signature.SignatureBuilder\n"
    ));
    fs::write(&project, yml)?;
    let nvflare = python.with_file_name("nvflare");
    sh(Command::new(&nvflare)
        .arg("provision")
        .arg("-p")
        .arg(&project)
        .arg("-w")
        .arg(run.join("ws"))
        .stdin(Stdio::null()))?;
    let kits = run.join("ws").join(PROJECT).join("prod_00");
    for site in &SITES {
        ensure!(
            kits.join(site.name)
                .join("startup")
                .join(site.key_name())
                .exists(),
            "nvflare provision wrote no {} for {}",
            site.key_name(),
            site.name
        );
    }
    Ok(kits)
}

/// The namespaces: a router, the broker and one per site, each site on its own /24.
struct Network {
    hub: Netns,
    kbs: Netns,
    sites: Vec<Netns>,
}

impl Network {
    fn create() -> Result<Network> {
        let hub = Netns::create(HUB_NS)?;
        sh(hub
            .command(Path::new("sysctl"))
            .args(["-qw", "net.ipv4.ip_forward=1"]))?;
        let kbs = Netns::create(KBS_NS)?;
        link(&hub, "h-kbs", &kbs, KBS_ADDR, "10.99.9.1")?;
        let mut sites = Vec::new();
        for site in &SITES {
            let ns = Netns::create(site.netns)?;
            link(&hub, site.hub_if, &ns, site.addr, &site.hub_addr())?;
            sites.push(ns);
        }
        Ok(Network { hub, kbs, sites })
    }
}

/// A veth pair: `hub_if` in the router with `.1`, `eth0` in `ns` with `addr`, default route.
fn link(hub: &Netns, hub_if: &str, ns: &Netns, addr: &str, gateway: &str) -> Result<()> {
    sh(Command::new("ip").args([
        "link",
        "add",
        hub_if,
        "netns",
        hub.name(),
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ]))?;
    sh(Command::new("ip").args([
        "-n",
        hub.name(),
        "addr",
        "add",
        &format!("{gateway}/24"),
        "dev",
        hub_if,
    ]))?;
    sh(Command::new("ip").args(["-n", hub.name(), "link", "set", hub_if, "up"]))?;
    sh(Command::new("ip").args([
        "-n",
        ns.name(),
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ]))?;
    sh(Command::new("ip").args(["-n", ns.name(), "link", "set", "eth0", "up"]))?;
    sh(Command::new("ip").args(["-n", ns.name(), "route", "add", "default", "via", gateway]))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// One site's image as the image builder makes it: the kit signed by the project's root CA
/// with FLARE's own signer, then without its private key; the launcher; the policy.
/// Returns the key (the broker's resource).
fn prepare_site(
    run: &Path,
    kits: &Path,
    python: &Path,
    root: &Path,
    site: &Site,
) -> Result<PathBuf> {
    let dir = run.join("sites").join(site.name);
    let bundle = dir.join("bundle");
    let kit = bundle.join("kit");
    fs::create_dir_all(&bundle)?;
    sh(Command::new("cp")
        .arg("-a")
        .arg(kits.join(site.name))
        .arg(&kit))?;
    // The project admin signs the kit as FLARE's SignatureBuilder signs a CC participant's
    // (every folder's signature.json, with the project's root CA key, from the kit's root),
    // private key included: FLARE's runtime check (`secure_train`) then verifies the key
    // the broker releases at boot against the project's signature.
    sh(Command::new(python)
        .arg("-c")
        .arg(RESIGN)
        .arg(run.join("ws"))
        .arg(&kit))?;
    // The private key leaves the image: the broker holds it.
    let key = run.join("keys").join(format!("{}.key", site.name));
    fs::create_dir_all(key.parent().context("key folder")?)?;
    fs::rename(kit.join("startup").join(site.key_name()), &key)?;
    fs::copy(
        root.join("examples/flare/launch.sh"),
        bundle.join("launch.sh"),
    )?;
    sh(Command::new("chmod")
        .args(["-R", "u=rwX,go=rX"])
        .arg(&bundle))?;
    set_mode(&bundle.join("launch.sh"), 0o755)?;
    set_mode(&dir, 0o755)?;
    // The pin: the SHA-256 fingerprint of the project's root CA certificate.
    let fingerprint = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(kit.join("startup/rootCA.pem"))
        .output()
        .context("running openssl x509 -fingerprint")?;
    let text = String::from_utf8_lossy(&fingerprint.stdout);
    let pin = text
        .trim()
        .split_once('=')
        .map(|(_, pin)| pin.to_string())
        .context("openssl printed no fingerprint of rootCA.pem")?;
    fs::write(dir.join("policy.toml"), policy(site, &dir, python, &pin))?;
    Ok(key)
}

/// A copy of site-1's image whose kit has one changed byte in `startup/fed_client.json`:
/// `reference-values` (the measure stage) must refuse it, naming the file.
fn tampered_kit_is_refused(warden: &Path, run: &Path) -> Result<()> {
    let good = run.join("sites/site-1");
    let bad = run.join("tampered/site-1");
    fs::create_dir_all(&bad)?;
    sh(Command::new("cp")
        .arg("-a")
        .arg(good.join("bundle"))
        .arg(bad.join("bundle")))?;
    let config = bad.join("bundle/kit/startup/fed_client.json");
    let mut text = fs::read(&config)?;
    text.push(b'\n');
    fs::write(&config, text)?;
    let policy = fs::read_to_string(good.join("policy.toml"))?.replace(
        &good.join("bundle").display().to_string(),
        &bad.join("bundle").display().to_string(),
    );
    fs::write(bad.join("policy.toml"), policy)?;
    let out = Command::new(warden)
        .args(["reference-values", "--policy"])
        .arg(bad.join("policy.toml"))
        .output()
        .context("running reference-values on the tampered kit")?;
    let said = String::from_utf8_lossy(&out.stderr);
    println!("a kit with one changed byte: {}", said.trim());
    ensure!(
        !out.status.success() && said.contains("startup/fed_client.json"),
        "reference-values accepted a tampered startup kit or did not name the file: {said}"
    );
    Ok(())
}

/// FLARE's own signer over a kit (`python -c RESIGN PROVISION_WS KIT`).
const RESIGN: &str = r#"
import glob, json, os, sys
from nvflare.lighter.utils import load_private_key, sign_folders
ws, kit = sys.argv[1], sys.argv[2]
state = json.load(open(glob.glob(os.path.join(ws, "*", "state", "cert.json"))[0]))
for old in glob.glob(os.path.join(kit, "**", "signature.json"), recursive=True):
    os.remove(old)
sign_folders(kit, load_private_key(state["root_pri_key"]), signature_file="signature.json")
"#;

fn policy(site: &Site, dir: &Path, python: &Path, root_ca: &str) -> String {
    let bundle = dir.join("bundle");
    let role = match site.role {
        Role::Server => "server",
        Role::Client => "client",
    };
    let network = match site.role {
        Role::Server => {
            let from = CLIENT_SUBNETS.map(|s| format!("\"{s}\"")).join(", ");
            format!("inbound = [{{ port = 8002, from = [{from}] }}, {{ port = 8003, from = [{from}] }}]\n")
        }
        // site-1 also hosts the project admin's session (port 8003).
        Role::Client if site.name == "site-1" => format!(
            "outbound = [{{ host = \"{SERVER_ADDR}\", port = 8002 }}, {{ host = \"{SERVER_ADDR}\", port = 8003 }}]\n"
        ),
        Role::Client => format!("outbound = [{{ host = \"{SERVER_ADDR}\", port = 8002 }}]\n"),
    };
    format!(
        r#"# {name}: written by cargo xtask flare
on_failure = "poweroff"

[workload]
bundle = "{bundle}"
source = "copy"
copy_to = "/run/cvm-warden/bundle"
exec = ["{bundle}/launch.sh", "{role}", "{name}", "{python}"]
user = "nobody"
workdir = "/"
umask = "0077"
restart = "never"

[workload.env]
PATH = "/usr/bin:/bin"
LANG = "C.UTF-8"

# The startup kit, verified as FLARE verifies it before anything is released; its private
# key is signed in the kit but withheld from the image (the broker releases it).
[workload.flare]
startup_kit = "kit"
root_ca_sha256 = "{root_ca}"
withheld = ["startup/{key}"]

[attestation]
tee = "tpm"
kbs = "http://{KBS_ADDR}:{KBS_PORT}"
insecure_http = true
tpm = "swtpm:host=127.0.0.1,port={TPM_PORT}"
tpm_ak_handle = "{AK_HANDLE}"
tries = 3
timeout = "60s"

[[secret]]
name = "{key}"
resource = "kbs:///{resource}"

[network]
{network}
[lockdown]
consoles = "off"
kernel_lockdown = "confidentiality"

[audit]
file = "{audit}"
file_required = true
console = false
"#,
        name = site.name,
        bundle = bundle.display(),
        python = python.display(),
        key = site.key_name(),
        resource = site.resource(),
        audit = dir.join("audit.jsonl").display(),
    )
}

fn federation(
    root: &Path,
    bins: &Bins,
    python: &Path,
    run: &Path,
    kits: &Path,
    net: &Network,
) -> Result<()> {
    banner("image builder: each site's bundle (the signed kit without its private key), policy, TPM and AK");
    let mut keys = Vec::new();
    for site in &SITES {
        keys.push(prepare_site(run, kits, python, root, site)?);
        sh(Command::new(&bins.warden)
            .args(["policy", "check"])
            .arg(run.join("sites").join(site.name).join("policy.toml"))
            .stdout(Stdio::null()))?;
    }
    tampered_kit_is_refused(&bins.warden, run)?;
    let mut tpms = Vec::new();
    for (site, ns) in SITES.iter().zip(&net.sites) {
        let dir = run.join("sites").join(site.name);
        let state = dir.join("tpm");
        fs::create_dir_all(&state)?;
        let tpm = Swtpm::start(ns, &state)?;
        provision_ak(ns, &dir)?;
        // The AK's public key as the image builder reads it for the model owner.
        sh(ns
            .command(Path::new("tpm2_readpublic"))
            .env(
                "TPM2TOOLS_TCTI",
                format!("swtpm:host=127.0.0.1,port={TPM_PORT}"),
            )
            .args(["-c", AK_HANDLE, "-f", "der", "-o"])
            .arg(dir.join("ak.der"))
            .stdout(Stdio::null()))?;
        tpms.push(tpm);
    }

    banner("model owner: reference values for every site, registered at the broker through its admin API");
    let broker_dir = run.join("kbs");
    fs::create_dir_all(&broker_dir)?;
    let admin_key = broker_dir.join("owner-admin.pem");
    sh(Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&admin_key))?;
    sh(Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&admin_key)
        .arg("-out")
        .arg(broker_dir.join("owner-admin.pub.pem")))?;
    let broker = Broker::start(
        &net.kbs,
        &bins.broker,
        &broker_dir,
        "# written by cargo xtask flare: nothing registered but the owner's admin key\n[admin]\npublic_key = \"owner-admin.pub.pem\"\nissuer = \"model-owner\"\naudience = \"kbs\"\nrole = \"admin\"\n",
        &format!("{KBS_ADDR}:{KBS_PORT}"),
    )?;
    let mut register = net.kbs.command(&bins.warden);
    register
        .args([
            "broker",
            "register",
            "--kbs",
            &format!("http://{KBS_ADDR}:{KBS_PORT}"),
        ])
        .args(["--insecure-http", "--issuer", "model-owner", "--admin-key"])
        .arg(&admin_key)
        .arg("--replace-resource-policy");
    for (site, key) in SITES.iter().zip(&keys) {
        let dir = run.join("sites").join(site.name);
        let values = json_of(
            Command::new(&bins.warden)
                .args(["reference-values", "--format", "trustee", "--policy"])
                .arg(dir.join("policy.toml"))
                .arg("--ak")
                .arg(dir.join("ak.der"))
                // Nothing measures into PCR 11 of these TPMs.
                .args(["--tpm-pcr11", &"0".repeat(64)]),
        )?;
        ensure!(
            values["warnings"].as_array().is_some_and(Vec::is_empty),
            "reference-values for {} warns: {}",
            site.name,
            values["warnings"]
        );
        println!(
            "{}: PCR 15 {} (bundle {})",
            site.name, values["reference_values"]["tpm_pcr15"][0], values["workload"]
        );
        let file = dir.join("trustee-values.json");
        fs::write(&file, serde_json::to_vec_pretty(&values)?)?;
        register.arg("--values").arg(&file);
        register
            .arg("--resource")
            .arg(format!("{}={}", site.resource(), key.display()));
    }
    let rego = broker_dir.join("default_cpu.rego");
    fs::write(
        &rego,
        "package policy\n\nimport rego.v1\n\ndefault executables := 33\n\nexecutables := 3 if {\n\tinput.tpm\n\tinput.tpm.pcr11 in query_reference_value(\"tpm_pcr11\")\n\tinput.tpm.pcr15 in query_reference_value(\"tpm_pcr15\")\n\tinput.tpm.ak_public in query_reference_value(\"trusted_aks\")\n}\n",
    )?;
    register.arg("--attestation-policy").arg(&rego);
    let registered = json_of(&mut register)?;
    println!("{}", serde_json::to_string_pretty(&registered)?);

    banner("reboot every site's TPM (fresh PCRs), then boot the three sites behind cvm-warden");
    for tpm in &mut tpms {
        tpm.restart()?;
    }
    let admin = run.join("admin");
    sh(Command::new("cp")
        .arg("-a")
        .arg(kits.join(ADMIN))
        .arg(&admin))?;
    sh(Command::new("cp")
        .arg("-a")
        .arg(root.join("examples/flare/jobs/hello-numpy"))
        .arg(run.join("job")))?;
    let listener = Listener::start(&net.sites[1], python)?;
    let started = Instant::now();
    let mut boots = Vec::new();
    for (site, ns) in SITES.iter().zip(&net.sites) {
        let dir = run.join("sites").join(site.name);
        boots.push((
            site,
            spawn_boot(
                ns,
                &bins.warden,
                &dir.join("policy.toml"),
                &dir.join("console.log"),
            )?,
        ));
    }
    let outcome = drive_job(root, run, python, net, &admin, "behind cvm-warden", || {
        ensure!(
            !probe(net, python)?,
            "a connection to site-1's port {CLOSED_PORT}, which its policy never allows, was answered while the job ran"
        );
        Ok(())
    });
    let mut failed = Vec::new();
    for (site, child) in &mut boots {
        let status = wait_child(child, Duration::from_secs(60));
        let dir = run.join("sites").join(site.name);
        let console = fs::read_to_string(dir.join("console.log")).unwrap_or_default();
        if !status.is_some_and(|s| s.success()) {
            failed.push(format!(
                "{} ended with {status:?}; its console:\n{}",
                site.name,
                tail(&console, 40)
            ));
        }
    }
    let wall_warden = started.elapsed();
    drop(listener);
    broker.stop();
    for tpm in &mut tpms {
        tpm.stop()?;
    }
    let report = outcome?;
    ensure!(failed.is_empty(), "{}", failed.join("\n"));

    banner("the three audit logs, verified against each site's AK");
    for site in &SITES {
        let dir = run.join("sites").join(site.name);
        audit_verify_attested(&bins.warden, &dir.join("audit.jsonl"), &dir.join("ak.der"))?;
    }

    banner("the same job in the same namespaces without cvm-warden (keys in the kits, no lockdown, no firewall)");
    let plain = baseline(root, run, kits, python, net)?;

    let with = report.job_wall_s;
    let without = plain.job_wall_s;
    println!(
        "\nflare: hello-numpy FINISHED:COMPLETED with {} behind cvm-warden",
        report.contributions.join(", ")
    );
    println!(
        "flare: job wall time {with:.2} s behind cvm-warden, {without:.2} s without: ratio {:.2} (whole run behind cvm-warden, boots included: {:.1} s)",
        with / without,
        wall_warden.as_secs_f64()
    );
    Ok(())
}

/// What `submit.py` printed.
struct JobReport {
    job_wall_s: f64,
    contributions: Vec<String>,
}

/// Submits the job from site-1's namespace (a client subnet) through FLARE's admin API,
/// runs `during` once the job is submitted, and waits for the job and the sites' shutdown.
fn drive_job(
    root: &Path,
    run: &Path,
    python: &Path,
    net: &Network,
    admin: &Path,
    label: &str,
    during: impl FnOnce() -> Result<()>,
) -> Result<JobReport> {
    let started_flag = run.join(format!("job-submitted-{}", label.replace(' ', "-")));
    let _ = fs::remove_file(&started_flag);
    let mut submit = net.sites[1].command(python);
    submit
        .arg(root.join("examples/flare/submit.py"))
        .arg(admin)
        .arg(run.join("job"))
        .args(["--timeout", "300", "--shutdown", "--started"])
        .arg(&started_flag)
        .stdout(Stdio::piped());
    eprintln!("$ {}", show(&submit));
    let mut child = submit.spawn().context("cannot start submit.py")?;
    let submitted = wait_until(Duration::from_secs(300), "the job to be submitted", || {
        started_flag.exists() || child.try_wait().is_ok_and(|s| s.is_some())
    });
    let during = submitted.and_then(|()| {
        ensure!(
            started_flag.exists(),
            "submit.py ended before it submitted the job"
        );
        during()
    });
    let out = child.wait_with_output().context("waiting for submit.py")?;
    during?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{text}");
    // FLARE's client prints progress lines first; the report is the last line.
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(last)
        .with_context(|| format!("submit.py printed no JSON report ({})", out.status))?;
    ensure!(
        out.status.success()
            && report["status"] == "FINISHED:COMPLETED"
            && report["all_contributed"] == true,
        "the hello-numpy job {label} did not complete with every client contributing: {report}"
    );
    Ok(JobReport {
        job_wall_s: report["job_wall_s"].as_f64().context("no job_wall_s")?,
        contributions: report["contributions"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Connects from the router to site-1's [`CLOSED_PORT`]; `Ok(true)` when the listener
/// answered, `Ok(false)` when the connection was refused or timed out.
fn probe(net: &Network, python: &Path) -> Result<bool> {
    let site = &SITES[1];
    let out = net
        .hub
        .command(python)
        .args(["-c", PROBE, site.addr, &CLOSED_PORT.to_string()])
        .output()
        .context("running the port probe")?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    println!("probe {}:{CLOSED_PORT} from the router: {said}", site.addr);
    Ok(said == "open")
}

const PROBE: &str = r#"
import socket, sys
s = socket.socket()
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print(s.recv(16).decode().strip() or "connected, no banner")
except Exception as e:
    print(type(e).__name__, e)
"#;

/// A listener on [`CLOSED_PORT`] in site-1's namespace (outside its sandbox): without the
/// firewall a connection to it would succeed.
struct Listener(Child);

impl Listener {
    fn start(ns: &Netns, python: &Path) -> Result<Listener> {
        let child = ns
            .command(python)
            .args(["-c", LISTENER])
            .arg(CLOSED_PORT.to_string())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start the probe listener")?;
        Ok(Listener(child))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const LISTENER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
while True:
    c, _ = s.accept()
    c.sendall(b"open\n")
    c.close()
"#;

/// The same FLARE sites in the same namespaces without cvm-warden: the provisioned kits as
/// they are (keys inside), no lockdown, the firewall flushed, FLARE as root with a private
/// `/tmp` (what the sandbox gives it too), started by the same launcher.
fn baseline(
    root: &Path,
    run: &Path,
    kits: &Path,
    python: &Path,
    net: &Network,
) -> Result<JobReport> {
    let mut children = Vec::new();
    for (site, ns) in SITES.iter().zip(&net.sites) {
        sh(ns.command(Path::new("nft")).args(["flush", "ruleset"]))?;
        let dir = run.join("plain").join(site.name);
        fs::create_dir_all(&dir)?;
        sh(Command::new("cp")
            .arg("-a")
            .arg(kits.join(site.name))
            .arg(dir.join("kit")))?;
        fs::copy(root.join("examples/flare/launch.sh"), dir.join("launch.sh"))?;
        set_mode(&dir.join("launch.sh"), 0o755)?;
        let role = match site.role {
            Role::Server => "server",
            Role::Client => "client",
        };
        let mut cmd = ns.command(Path::new("unshare"));
        cmd.args([
            "--mount",
            "--fork",
            "sh",
            "-c",
            "mount -t tmpfs tmpfs /tmp && exec \"$0\" \"$@\"",
        ])
        .arg(dir.join("launch.sh"))
        .args([role, site.name])
        .arg(python)
        .stdout(fs::File::create(dir.join("console.log"))?)
        .stderr(Stdio::from(fs::File::create(dir.join("console.err"))?));
        eprintln!("$ {} &", show(&cmd));
        children.push(cmd.spawn().context("cannot start a plain FLARE site")?);
    }
    let admin = run.join("admin-plain");
    sh(Command::new("cp")
        .arg("-a")
        .arg(kits.join(ADMIN))
        .arg(&admin))?;
    let listener = Listener::start(&net.sites[1], python)?;
    let report = drive_job(root, run, python, net, &admin, "without cvm-warden", || {
        // The same probe now reaches the listener: the refusal above was the firewall's.
        ensure!(
            probe(net, python)?,
            "without cvm-warden the probe listener on site-1 did not answer, so the refusal behind cvm-warden proves nothing"
        );
        Ok(())
    });
    drop(listener);
    for child in &mut children {
        if wait_child(child, Duration::from_secs(60)).is_none() {
            eprintln!("(a plain FLARE site did not exit after shutdown; killed)");
        }
    }
    report
}

fn wait_child(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(100)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn banner(text: &str) {
    println!("\n=== flare: {text} ===");
}
