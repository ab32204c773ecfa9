//! The `edgeinfer` command: argument parsing, logging, signals and exit
//! codes. Everything else lives in the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgeinfer::commands::{self, InferInput, OneShotError};
use edgeinfer::config::{Config, ConfigError, EXAMPLE};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// sysexits.h: the input data was incorrect.
const EX_DATAERR: u8 = 65;
/// sysexits.h: a configuration error.
const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "edgeinfer",
    version,
    about = "On-device inference for MQTT sensor streams (quantized ONNX on tract)"
)]
struct Cli {
    /// Debug logging (RUST_LOG overrides).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (SIGTERM/SIGINT stop it cleanly, SIGHUP reloads the config).
    Run {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a config and load every model it names; print every problem.
    CheckConfig {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Print a complete, commented example config.
    PrintConfig,
    /// Zero-setup showcase: in-process broker, bundled models, simulated devices.
    Demo {
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Run one input through a model and print the result JSON.
    Infer {
        /// A model manifest (*.toml) or a bare .onnx.
        #[arg(short, long)]
        model: PathBuf,
        /// JSON sensor payload file, or raw little-endian f32 (.f32/.bin/.raw).
        #[arg(long, conflicts_with = "json", required_unless_present = "json")]
        input: Option<PathBuf>,
        /// The JSON sensor payload itself.
        #[arg(long)]
        json: Option<String>,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Measure a model: load time, inference p50/p90/p99, peak RSS.
    Bench {
        #[arg(short, long)]
        model: PathBuf,
        #[arg(long, default_value_t = 1000)]
        runs: usize,
        /// An image model infers on this JPEG or PNG, and its decode and
        /// fit are timed too (a sensor model's windowing always is).
        #[arg(long, value_name = "FILE")]
        image: Option<PathBuf>,
        /// Also time every operator of the plan (tract) and print where
        /// inference spends its time.
        #[arg(long)]
        profile: bool,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Signed model bundles for `model/update` (README "Fleet operations").
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// List models (those a config names, or the bundled ones).
    Models {
        #[arg(short, long, conflicts_with = "check")]
        config: Option<PathBuf>,
        /// Load every .onnx under DIR and print a table (loads?, backend, facts, error).
        #[arg(long, value_name = "DIR")]
        check: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Engine settings for --check and the bundled models (a config's
        /// models use its own `[engine]` settings).
        #[command(flatten)]
        engine: EngineArgs,
    },
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Make a signing key pair (minisign format): NAME.pub and NAME.key.
    Keygen {
        /// Path prefix of the two files.
        #[arg(long, default_value = "edgeinfer")]
        out: PathBuf,
    },
    /// Pack a model (its manifest, or a bare .onnx) into a bundle.
    Create {
        /// The model manifest (*.toml) or .onnx.
        model: PathBuf,
        /// The model's version, as the fleet names it.
        #[arg(long)]
        version: String,
        /// Bundle sequence number: must grow with every bundle of this model.
        #[arg(long)]
        seq: u64,
        /// Refused after this date (YYYY-MM-DD, UTC) or unix time.
        #[arg(long)]
        not_after: String,
        /// Raw inputs to record the model's answers for ({"inputs": [...]},
        /// or a *.reference.json with cases[].input); the gateway checks
        /// them before it swaps the model in.
        #[arg(long, value_name = "FILE")]
        reference_inputs: Option<PathBuf>,
        /// Largest difference the gateway accepts, relative to max(1, |expected|).
        #[arg(long, default_value_t = 0.02)]
        tolerance: f32,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Sign a bundle: writes BUNDLE.minisig.
    Sign {
        bundle: PathBuf,
        /// The secret key file (from `bundle keygen` or `minisign -G`).
        #[arg(long)]
        key: PathBuf,
        /// Environment variable holding the key's password (encrypted keys).
        #[arg(long, value_name = "VAR")]
        password_env: Option<String>,
    },
    /// Verify a bundle's signature, contents and expiry; print its metadata.
    Verify {
        bundle: PathBuf,
        /// Trusted public key file(s).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// The signature (default BUNDLE.minisig).
        #[arg(long)]
        signature: Option<PathBuf>,
    },
}

fn bundle_command(command: BundleCommand) -> anyhow::Result<ExitCode> {
    use edgeinfer::ops::{bundle, reference};
    match command {
        BundleCommand::Keygen { out } => {
            let (public, secret) = bundle::keygen().map_err(anyhow::Error::msg)?;
            let (pub_path, key_path) = (out.with_extension("pub"), out.with_extension("key"));
            for p in [&pub_path, &key_path] {
                anyhow::ensure!(!p.exists(), "{} exists; not overwriting it", p.display());
            }
            std::fs::write(&pub_path, public)?;
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&key_path)?;
                f.write_all(secret.as_bytes())?;
            }
            println!(
                "public key {} (trust it in operations.trusted_key_files)",
                pub_path.display()
            );
            println!(
                "secret key {} (keep it off the gateways)",
                key_path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        BundleCommand::Create {
            model,
            version,
            seq,
            not_after,
            reference_inputs,
            tolerance,
            out,
        } => {
            let not_after = bundle::parse_time(&not_after).map_err(anyhow::Error::msg)?;
            let reference = match reference_inputs {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| path.display().to_string())?;
                    let inputs = reference::read_inputs(&text)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    let loaded = std::sync::Arc::new(edgeinfer::model::Model::load(&model)?);
                    Some(reference::make(&loaded, inputs, tolerance).map_err(anyhow::Error::msg)?)
                }
                None => None,
            };
            let cases = reference.as_ref().map_or(0, |r| r.cases.len());
            let bytes = bundle::create(bundle::CreateArgs {
                model: &model,
                version,
                seq,
                not_after,
                reference,
            })
            .map_err(anyhow::Error::msg)?;
            std::fs::write(&out, &bytes)?;
            println!(
                "{}: {} bytes, {cases} reference case(s)",
                out.display(),
                bytes.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        BundleCommand::Sign {
            bundle: path,
            key,
            password_env,
        } => {
            let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
            let secret =
                std::fs::read_to_string(&key).with_context(|| key.display().to_string())?;
            let password = match password_env {
                Some(var) => Some(std::env::var(&var).with_context(|| format!("${var}"))?),
                None => None,
            };
            let sig = bundle::sign(&bytes, &secret, password).map_err(anyhow::Error::msg)?;
            let sig_path = PathBuf::from(format!("{}.minisig", path.display()));
            std::fs::write(&sig_path, sig)?;
            println!("{}", sig_path.display());
            Ok(ExitCode::SUCCESS)
        }
        BundleCommand::Verify {
            bundle: path,
            keys,
            signature,
        } => {
            let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
            let sig_path =
                signature.unwrap_or_else(|| PathBuf::from(format!("{}.minisig", path.display())));
            let sig = std::fs::read_to_string(&sig_path)
                .with_context(|| sig_path.display().to_string())?;
            let trusted = keys
                .iter()
                .map(|k| {
                    let text =
                        std::fs::read_to_string(k).with_context(|| k.display().to_string())?;
                    bundle::public_key(&text).map_err(|e| anyhow::anyhow!("{}: {e}", k.display()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            match bundle::verify(&bytes, &sig, &trusted, bundle::now_s()) {
                Ok(v) => {
                    println!(
                        "{}",
                        serde_json::json!({"ok": true, "signed_by": v.key_id, "metadata": v.meta, "reference_cases": v.reference.map_or(0, |r| r.cases.len())})
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("edgeinfer: {}: {e}", path.display());
                    Ok(ExitCode::from(EX_DATAERR))
                }
            }
        }
    }
}

/// The one-shot commands' engine settings (the config's `[engine]` keys).
#[derive(clap::Args, Debug)]
struct EngineArgs {
    /// auto (measure every available engine, use the fastest that agrees), tract or onnxruntime.
    #[arg(long, default_value = "auto", value_parser = ["auto", "tract", "onnxruntime"])]
    backend: String,
    /// ONNX Runtime execution providers in the order tried, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    providers: Vec<String>,
    /// Refuse a provider that would leave part of the graph to the CPU provider.
    #[arg(long)]
    strict: bool,
    /// Fail rather than fall back to tract when every provider is passed over.
    #[arg(long)]
    no_fallback: bool,
    /// libonnxruntime.so to load (default: ORT_DYLIB_PATH, else the usual places).
    #[arg(long, value_name = "PATH")]
    onnxruntime_library: Option<PathBuf>,
    /// ONNX Runtime intra-op threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

impl EngineArgs {
    fn options(&self) -> edgeinfer::model::EngineOptions {
        use edgeinfer::model::BackendChoice;
        edgeinfer::model::EngineOptions {
            backend: match self.backend.as_str() {
                "tract" => BackendChoice::Tract,
                "onnxruntime" => BackendChoice::OnnxRuntime,
                _ => BackendChoice::Auto,
            },
            providers: self.providers.clone(),
            fallback: !self.no_fallback,
            strict: self.strict,
            threads: self.threads.max(1),
            library: self.onnxruntime_library.clone(),
            cache_dir: None,
            ..Default::default()
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    edgeinfer::systemd::init_logging(cli.verbose);
    // Panics inside the inference engine are caught and reported as errors;
    // log them as one line instead of the default backtrace on stderr.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(%location, %message, "Panic");
    }));
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("edgeinfer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // Inference has its own threads; two async workers carry the network.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::PrintConfig => {
            print!("{EXAMPLE}");
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => Ok(check_config(&config)),
        Command::Bundle { command } => bundle_command(command),
        Command::Run { config } => {
            let loaded = match load_valid(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            runtime()?.block_on(serve(loaded))
        }
        Command::Demo { seconds } => {
            let summary = runtime()?
                .block_on(edgeinfer::demo::run(seconds))
                .map_err(anyhow::Error::msg)?;
            Ok(if summary.results > 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Infer {
            model,
            input,
            json,
            engine,
        } => {
            let input = match (&input, &json) {
                (Some(path), _) => InferInput::File(path),
                (None, Some(text)) => InferInput::Json(text),
                (None, None) => unreachable!("clap requires one"),
            };
            match commands::infer(&model, input, &engine.options()) {
                Ok(result) => {
                    println!("{result}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e @ OneShotError::Input(_)) => {
                    eprintln!("edgeinfer: {e}");
                    Ok(ExitCode::from(EX_DATAERR))
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Bench {
            model,
            runs,
            image,
            profile,
            json,
            engine,
        } => {
            let r = commands::bench(&model, runs, &engine.options(), image.as_deref(), profile)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("model      {} ({}, {})", r.model, r.input, r.backend);
                println!("load       {:.2} ms", r.load_ms);
                println!(
                    "inference  p50 {:.4} ms  p90 {:.4} ms  p99 {:.4} ms  mean {:.4} ms  ({} runs)",
                    r.p50_ms, r.p90_ms, r.p99_ms, r.mean_ms, r.runs
                );
                if let Some(pre) = &r.pre {
                    println!(
                        "input      p50 {:.4} ms  p99 {:.4} ms  ({})",
                        pre.p50_ms, pre.p99_ms, pre.what
                    );
                }
                println!("peak RSS   {:.1} MiB", r.peak_rss_bytes as f64 / 1048576.0);
                if let Some(p) = &r.profile {
                    println!(
                        "\nprofile    {:.4} ms per run over {} runs, by operator:",
                        p.ms_per_run, p.runs
                    );
                    for (title, rows) in [("operator", &p.ops), ("slowest node", &p.nodes)] {
                        println!("  {:>6}  {:>9}  {title}", "share", "ms/run");
                        for o in rows.iter().take(12) {
                            println!(
                                "  {:>5.1}%  {:>9.4}  {} ({})",
                                o.share * 100.0,
                                o.ms_per_run,
                                o.op,
                                o.of
                            );
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Models {
            check: Some(dir),
            json,
            engine,
            ..
        } => {
            let options = engine.options();
            let files = commands::onnx_files(&dir).with_context(|| dir.display().to_string())?;
            let rows = commands::describe(
                &files
                    .into_iter()
                    .map(|f| (f, options.clone()))
                    .collect::<Vec<_>>(),
            );
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", commands::check_table(&rows, &dir));
            }
            let failed = rows.iter().filter(|r| r.error.is_some()).count();
            eprintln!(
                "{} model(s), {} load, {failed} fail",
                rows.len(),
                rows.len() - failed
            );
            Ok(if failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Models {
            config,
            json,
            engine,
            ..
        } => models(config.as_deref(), json, &engine.options()),
    }
}

fn load_valid(path: &Path) -> Result<Config, ExitCode> {
    let report = |e: &ConfigError| {
        for p in e.problems() {
            eprintln!("{p}");
        }
        ExitCode::from(EX_CONFIG)
    };
    let config = Config::load(path).map_err(|e| report(&e))?;
    let problems = config.validate();
    if !problems.is_empty() {
        return Err(report(&ConfigError::Invalid(problems)));
    }
    Ok(config)
}

fn check_config(path: &Path) -> ExitCode {
    let problems = match Config::load(path) {
        Ok(config) => edgeinfer::check(&config),
        Err(e) => e.problems(),
    };
    if problems.is_empty() {
        println!("{}: ok", path.display());
        ExitCode::SUCCESS
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!("{}: {} problem(s)", path.display(), problems.len());
        ExitCode::from(EX_CONFIG)
    }
}

/// Runs the daemon until SIGTERM/SIGINT. SIGHUP reloads the configuration
/// file (see `edgeinfer::run_reloading`): a reload that fails its checks keeps
/// the running configuration.
async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let token = CancellationToken::new();
    let (hup_tx, hup_rx) = flume::bounded(4);
    let mut daemon = tokio::spawn(edgeinfer::run_reloading(
        config,
        token.clone(),
        Some(hup_rx),
    ));
    loop {
        tokio::select! {
            _ = term.recv() => token.cancel(),
            _ = int.recv() => token.cancel(),
            _ = hup.recv() => {
                tracing::info!("Reloading configuration");
                let _ = hup_tx.try_send(());
            }
            ended = &mut daemon => {
                return match ended {
                    Ok(Ok(())) => Ok(ExitCode::SUCCESS),
                    Ok(Err(edgeinfer::RunError::Config(problems))) => {
                        for p in problems { eprintln!("{p}"); }
                        Ok(ExitCode::from(EX_CONFIG))
                    }
                    Ok(Err(e)) => Err(e.into()),
                    Err(e) => Err(anyhow::anyhow!("daemon task failed: {e}")),
                };
            }
        }
    }
}

fn models(
    config: Option<&Path>,
    json: bool,
    options: &edgeinfer::model::EngineOptions,
) -> anyhow::Result<ExitCode> {
    let _unpacked;
    let paths: Vec<(PathBuf, edgeinfer::model::EngineOptions)> = match config {
        Some(path) => {
            let c = Config::load(path)?;
            let mut v: Vec<_> = c
                .pipelines
                .iter()
                .map(|p| (c.model_path(p), edgeinfer::engine_options(&c, p)))
                .collect();
            v.dedup();
            v
        }
        None => {
            let dir = edgeinfer::bundled::TempDir::new("models")?;
            let v = edgeinfer::bundled::unpack(dir.path())?;
            _unpacked = dir;
            v.into_iter().map(|p| (p, options.clone())).collect()
        }
    };
    let rows = commands::describe(&paths);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        for r in &rows {
            println!("{}", r.name);
            println!(
                "  file     {}",
                if config.is_some() {
                    r.file.clone()
                } else {
                    format!(
                        "(bundled) {}",
                        Path::new(&r.file)
                            .file_name()
                            .unwrap_or_default()
                            .to_string_lossy()
                    )
                }
            );
            match &r.error {
                Some(e) => println!("  error    {e}"),
                None => {
                    println!("  sha256   {}", r.sha256.as_deref().unwrap_or(""));
                    match r.engine.as_ref().and_then(|e| e.variant.as_deref()) {
                        Some(v) => println!("  backend  {} ({v})", r.backend),
                        None => println!("  backend  {}", r.backend),
                    }
                    if let Some(e) = &r.engine {
                        println!("  chosen   {} ({})", e.reason, e.requested);
                        for p in &e.passed_over {
                            println!("  passed   {p}");
                        }
                        for m in &e.measured {
                            println!(
                                "  measured {} p50 {:.3} ms over {} runs{}",
                                m.label(),
                                m.p50_ms,
                                m.runs,
                                m.max_abs_diff
                                    .map(|d| format!(", max |difference| {d}"))
                                    .unwrap_or_default()
                            );
                        }
                    }
                    println!("  kind     {}", r.kind);
                    for i in &r.inputs {
                        println!("  input    {i}");
                    }
                    for o in &r.outputs {
                        println!("  output   {o}");
                    }
                }
            }
        }
    }
    Ok(if rows.iter().any(|r| r.error.is_some()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
