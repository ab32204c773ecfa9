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
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        engine: EngineArgs,
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
        Command::Run { config } => {
            let loaded = match load_valid(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            runtime()?.block_on(serve(config, loaded))
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
            json,
            engine,
        } => {
            let r = commands::bench(&model, runs, &engine.options())?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("model      {} ({}, {})", r.model, r.input, r.backend);
                println!("load       {:.2} ms", r.load_ms);
                println!(
                    "inference  p50 {:.4} ms  p90 {:.4} ms  p99 {:.4} ms  mean {:.4} ms  ({} runs)",
                    r.p50_ms, r.p90_ms, r.p99_ms, r.mean_ms, r.runs
                );
                println!("peak RSS   {:.1} MiB", r.peak_rss_bytes as f64 / 1048576.0);
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

/// Runs the daemon until SIGTERM/SIGINT. SIGHUP reloads: the new config is
/// checked in full (models loaded) first, and a failing one keeps the
/// running configuration.
async fn serve(path: PathBuf, mut config: Config) -> anyhow::Result<ExitCode> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        let token = CancellationToken::new();
        let mut daemon = tokio::spawn(edgeinfer::run(config.clone(), token.clone()));
        let next = loop {
            tokio::select! {
                _ = term.recv() => break None,
                _ = int.recv() => break None,
                _ = hup.recv() => {
                    tracing::info!(config = %path.display(), "Reloading configuration");
                    let candidate = Config::load(&path).map_err(|e| e.problems()).and_then(|c| {
                        let problems = edgeinfer::check(&c);
                        if problems.is_empty() { Ok(c) } else { Err(problems) }
                    });
                    match candidate {
                        Ok(c) => break Some(c),
                        Err(problems) => {
                            for p in problems {
                                tracing::error!(problem = %p, "Reload rejected; keeping the running configuration");
                            }
                        }
                    }
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
        };
        if next.is_some() {
            edgeinfer::systemd::notify_reloading();
        }
        token.cancel();
        daemon
            .await
            .context("daemon task")?
            .map_err(anyhow::Error::from)?;
        match next {
            Some(c) => config = c,
            None => return Ok(ExitCode::SUCCESS),
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
                    println!("  backend  {}", r.backend);
                    if let Some(e) = &r.engine {
                        println!("  chosen   {} ({})", e.reason, e.requested);
                        for p in &e.passed_over {
                            println!("  passed   {p}");
                        }
                        for m in &e.measured {
                            println!(
                                "  measured {} p50 {:.3} ms over {} runs{}",
                                m.runs_on,
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
