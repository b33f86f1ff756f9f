//! `kbs-test-broker --config FILE --listen ADDR [--tls-cert PEM --tls-key PEM] [--ready-file F]`
//!
//! Serves until killed. Prints `kbs-test-broker listening on <URL>` once listening and, with
//! `--ready-file`, writes the URL (and a newline) to that file atomically.

use std::path::PathBuf;
use std::process::ExitCode;

use kbs_test_broker::{Broker, BrokerConfig, TlsConfig};

const USAGE: &str = "usage: kbs-test-broker --config FILE --listen ADDR \
                     [--tls-cert PEM --tls-key PEM] [--ready-file FILE]";

struct Args {
    config: PathBuf,
    listen: String,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    ready_file: Option<PathBuf>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut config, mut listen, mut tls_cert, mut tls_key, mut ready_file) =
        (None, None, None, None, None);
    while let Some(flag) = args.next() {
        let slot: &mut Option<String> = match flag.as_str() {
            "--config" => &mut config,
            "--listen" => &mut listen,
            "--tls-cert" => &mut tls_cert,
            "--tls-key" => &mut tls_key,
            "--ready-file" => &mut ready_file,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        };
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        if slot.replace(value).is_some() {
            return Err(format!("{flag} given twice\n{USAGE}"));
        }
    }
    let config = config.ok_or_else(|| format!("--config is required\n{USAGE}"))?;
    let listen = listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?;
    if tls_cert.is_some() != tls_key.is_some() {
        return Err(format!("--tls-cert and --tls-key go together\n{USAGE}"));
    }
    Ok(Args {
        config: config.into(),
        listen,
        tls_cert: tls_cert.map(PathBuf::from),
        tls_key: tls_key.map(PathBuf::from),
        ready_file: ready_file.map(PathBuf::from),
    })
}

fn print_error(err: &dyn std::error::Error) {
    eprintln!("kbs-test-broker: error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        eprintln!("  because: {cause}");
        source = cause.source();
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let mut config = match BrokerConfig::from_toml_file(&args.config) {
        Ok(config) => config,
        Err(e) => {
            print_error(&e);
            return ExitCode::from(1);
        }
    };
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(TlsConfig { cert, key });
    }
    config.log_requests = true;
    let broker = match Broker::start(config, &args.listen) {
        Ok(broker) => broker,
        Err(e) => {
            print_error(&e);
            return ExitCode::from(1);
        }
    };
    println!("kbs-test-broker listening on {}", broker.url());
    if let Some(ready) = &args.ready_file {
        let mut tmp = ready.clone().into_os_string();
        tmp.push(".tmp");
        let written = std::fs::write(&tmp, format!("{}\n", broker.url()))
            .and_then(|()| std::fs::rename(&tmp, ready));
        if let Err(e) = written {
            eprintln!(
                "kbs-test-broker: error: cannot write the ready file {}: {e}",
                ready.display()
            );
            return ExitCode::from(1);
        }
    }
    loop {
        std::thread::park();
    }
}
