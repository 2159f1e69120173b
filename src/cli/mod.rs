//! The headless command line. Arguments are parsed once into validated values; each command
//! prints text or, with `--json`, one JSON document on stdout.

mod eval;
mod figures;
mod info;
mod predict;
mod train;

use std::path::{Path, PathBuf};

use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

use crate::data::Split;
use crate::model::{Arch, Model, ModelConfig, ModelKind, checkpoint, pytorch};

#[derive(Parser, Debug)]
#[command(
    name = "awnet",
    version,
    about = "AW-Net Lab: train, attack and inspect adversarially-weighted networks"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show a model's architecture, parameters per layer, configuration and metrics.
    Info(InfoArgs),
    /// Classify images: top-5 classes and, for AW-Net, the router's type probabilities and signals.
    Predict(PredictArgs),
    /// Find a dataset by name or path and say where it came from and what it holds.
    Data(DataArgs),
    /// Write a freshly initialised (untrained) model file.
    Init(InitArgs),
    /// Convert a PyTorch ResNet-18 state dict (.pt/.pth) into a model file.
    Import(ImportArgs),
    /// Clean and robust accuracy under a list of attacks, with the sanity checks.
    Eval(EvalArgs),
    /// Attack one picture and write the adversarial image.
    Attack(AttackArgs),
    /// Train a model: standard, PGD-AT, TRADES, or AW-Net (distilled, or teacher-free).
    Train(TrainArgs),
    /// Open the window (what `awnet` with no command does).
    Gui(GuiArgs),
    /// Write every figure (SVG, PNG, CSV, JSON) and a manifest, without a window.
    Figures(FiguresArgs),
}

#[derive(Args, Debug)]
pub struct FiguresArgs {
    /// The model; its layers name the per-layer figures.
    #[arg(long)]
    pub model: PathBuf,
    /// Models overlaid on the first (repeatable).
    #[arg(long)]
    pub compare: Vec<PathBuf>,
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    /// The folder the files go to (created if needed).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "pgd")]
    pub attack: crate::attack::AttackKind,
    /// L-inf radius, e.g. 0.1 or 8/255; the eps sweep runs from 0 to twice this.
    #[arg(long, default_value = "0.1")]
    pub eps: String,
    /// Attack iterations (the attack's default when not given).
    #[arg(long)]
    pub steps: Option<usize>,
    /// The first N test images.
    #[arg(long, default_value_t = 200)]
    pub n: usize,
    /// PNG scale: 720x480 points times this.
    #[arg(long, default_value_t = 2.0)]
    pub scale: f64,
}

#[derive(Args, Debug, Default)]
pub struct GuiArgs {
    /// Write a screenshot of the window once the tab's content is computed, then exit.
    #[arg(long)]
    pub screenshot: Option<PathBuf>,
    /// The tab to open on.
    #[arg(long, value_enum)]
    pub tab: Option<crate::gui::Tab>,
    /// Models to open (repeatable); the bundled models in models/ when none is given.
    #[arg(long)]
    pub model: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[arg(long, value_enum)]
    pub method: crate::train::Method,
    #[arg(long, value_enum, default_value = "small-cnn")]
    pub arch: Arch,
    /// Dataset name or folder; its train split is used, less the held-out part.
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    #[arg(long)]
    pub epochs: usize,
    /// The model file, written at every epoch end and on Ctrl-C.
    #[arg(long)]
    pub out: PathBuf,
    /// Standard-trained teacher (AW-Net distillation).
    #[arg(long)]
    pub teacher_clean: Option<PathBuf>,
    /// Adversarially trained teacher (AW-Net distillation).
    #[arg(long)]
    pub teacher_robust: Option<PathBuf>,
    /// L-inf radius of the training attack, e.g. 0.1 or 8/255 (default 0.1).
    #[arg(long)]
    pub eps: Option<String>,
    /// Continue the run stored in --out (its settings; --epochs may extend it).
    #[arg(long)]
    pub resume: bool,
    /// Append every epoch's metrics to this JSON-lines file.
    #[arg(long)]
    pub log: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    #[arg(long, value_enum, default_value = "sgd")]
    pub optimizer: crate::train::OptimizerKind,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// constant, cosine, or step:E1,E2 (x0.1 at those epochs).
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// PGD steps of the training attack (step eps/4).
    #[arg(long, default_value_t = 10)]
    pub attack_steps: usize,
    #[arg(long, default_value_t = 6.0)]
    pub trades_beta: f64,
    /// Weight of the router's type loss (AW-Net).
    #[arg(long, default_value_t = 1.0)]
    pub lambda_type: f64,
    /// AW-Net variant: weight of the router term in the training attack (0, the method: the
    /// attack climbs cross-entropy only; above 0 it also pushes the router towards "clean", as
    /// the adaptive attack does, so the router learns to see through it).
    #[arg(long, default_value_t = 0.0)]
    pub craft_router_lambda: f64,
    /// AW-Net variant: also craft adaptive examples with this router-term weight and show them
    /// only to the router's type loss, labelled adversarial (0: none, the method).
    #[arg(long, default_value_t = 0.0)]
    pub type_adaptive_lambda: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Base width of the backbone.
    #[arg(long)]
    pub width: Option<usize>,
    /// AW-Net: output channels of the router's three convolutions, as 16,32,64 (the default).
    #[arg(long, value_name = "C1,C2,C3")]
    pub router_channels: Option<String>,
    /// AW-Net: the signal range, omega = S * sigmoid(z) in (0, S); 2 (the default) starts every
    /// signal at 1.
    #[arg(long, value_name = "S")]
    pub signal_scale: Option<f64>,
    /// Images at the end of the train split kept out of training for the per-epoch metrics.
    #[arg(long, default_value_t = 5000)]
    pub holdout: usize,
    /// Held-out images evaluated at each epoch end.
    #[arg(long, default_value_t = 1000)]
    pub monitor_n: usize,
    /// PGD steps of the per-epoch robustness check.
    #[arg(long, default_value_t = 10)]
    pub monitor_steps: usize,
    /// Also write the checkpoint every N steps (besides every epoch end and Ctrl-C); with
    /// --resume it replaces the stored one (with --epochs, all a resumed run takes from the command).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// No random crop or flip.
    #[arg(long)]
    pub no_augment: bool,
    /// cpu, cuda or cuda:N (a GPU needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model file (.safetensors, or a PyTorch .pt/.pth state dict).
    pub model: PathBuf,
    /// fashion-mnist, mnist, cifar10, cifar100, or a folder.
    #[arg(long)]
    pub data: String,
    #[arg(long, value_enum, default_value = "test")]
    pub split: Split,
    /// Evaluate the first N images of the split (default: all).
    #[arg(long)]
    pub n: Option<usize>,
    /// Start at image K of the split: with --n, images K..K+N (say, the held-out end of the
    /// training split, or one chunk of a long evaluation).
    #[arg(long, default_value_t = 0)]
    pub first: usize,
    /// Comma-separated: clean, fgsm, pgd, mi-fgsm, cw, apgd-ce, apgd-dlr, square, noise, adaptive,
    /// autoattack, transfer.
    #[arg(long, default_value = "pgd")]
    pub attack: String,
    /// Radius in pixel units, a number or a fraction like 8/255 (default: 8/255 for colour
    /// images, 0.1 for grey); a comma-separated list gives accuracy against eps.
    #[arg(long)]
    pub eps: Option<String>,
    #[arg(long, value_enum, default_value = "linf")]
    pub norm: crate::attack::Threat,
    /// Iterations of PGD, CW, adaptive and MI-FGSM (default 20; MI-FGSM 10).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Step size (default 2.5 * eps / steps; MI-FGSM eps / steps).
    #[arg(long)]
    pub step_size: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub restarts: usize,
    /// Iterations of APGD-CE and APGD-T.
    #[arg(long, default_value_t = 100)]
    pub apgd_steps: usize,
    /// Query budget of Square.
    #[arg(long, default_value_t = 1000)]
    pub queries: usize,
    /// Weight of the router term in the adaptive attack.
    #[arg(long, default_value_t = 1.0)]
    pub lambda: f64,
    /// Model to craft transfer attacks on.
    #[arg(long)]
    pub source: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Skip the sanity checks.
    #[arg(long)]
    pub no_checks: bool,
    /// Images the sanity checks run on.
    #[arg(long, default_value_t = 100)]
    pub check_n: usize,
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// cpu, cuda or cuda:N (a GPU needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct AttackArgs {
    pub model: PathBuf,
    /// Picture file (PNG or JPEG), converted to the model's input.
    pub image: PathBuf,
    #[arg(long, value_enum, default_value = "pgd")]
    pub attack: crate::attack::AttackKind,
    /// A number or a fraction like 8/255.
    #[arg(long)]
    pub eps: String,
    #[arg(long, value_enum, default_value = "linf")]
    pub norm: crate::attack::Threat,
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub step_size: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub restarts: usize,
    /// Push the prediction towards this class (targeted attack).
    #[arg(long)]
    pub target: Option<u32>,
    /// The true class (default: the model's prediction on the clean picture).
    #[arg(long)]
    pub label: Option<u32>,
    #[arg(long, default_value_t = 1.0)]
    pub lambda: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the adversarial picture (PNG, lossless).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Model file (.safetensors, or a PyTorch .pt/.pth state dict).
    pub model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Model file (.safetensors, or a PyTorch .pt/.pth state dict).
    pub model: PathBuf,
    /// Picture files (PNG or JPEG); converted to the model's input size and channels.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct DataArgs {
    /// fashion-mnist, mnist, cifar10, cifar100, or a folder.
    pub name: String,
    #[arg(long, value_enum, default_value = "test")]
    pub split: Split,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    #[arg(long, value_enum, default_value = "small-cnn")]
    pub arch: Arch,
    #[arg(long, value_enum, default_value = "awnet")]
    pub kind: ModelKind,
    /// Dataset whose channels, image size and classes the model takes.
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    /// Base width (default: 32 for small-cnn, 64 for resnet18).
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the model (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// PyTorch state dict (.pt/.pth, zip format).
    pub input: PathBuf,
    /// Side of the input images the model is for.
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
    /// Where to write the model (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs one command.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Info(a) => info::run(&a),
        Command::Predict(a) => predict::run(&a),
        Command::Data(a) => data(&a),
        Command::Init(a) => init(&a),
        Command::Eval(a) => eval::run_eval(&a),
        Command::Train(a) => train::run(&a),
        Command::Attack(a) => eval::run_attack(&a),
        Command::Figures(a) => figures::run(&a),
        Command::Gui(a) => crate::gui::run(crate::gui::StartOptions {
            models: a.model,
            tab: a.tab,
            screenshot: a.screenshot,
        }),
        Command::Import(a) => {
            let mut o = String::new();
            let model = pytorch::import_pth(&a.input, Some(a.image_size))?;
            checkpoint::save(&model, &a.out)?;
            writeln!(o, "wrote {} ({} parameters)", a.out.display(), model.num_parameters())?;
            emit(&o)
        }
    }
}

/// Writes a command's output in one go; a reader that went away (`| head`) is not an error.
pub fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Opens a model file of either kind, by its extension.
pub fn open_model(path: &Path) -> Result<Model> {
    Ok(checkpoint::open(path)?)
}

fn data(a: &DataArgs) -> Result<()> {
    let mut o = String::new();
    let ds = crate::data::load(&a.name, a.split, None)?;
    let mut counts = vec![0usize; ds.num_classes()];
    for &l in &ds.labels {
        counts[usize::from(l)] += 1;
    }
    if a.json {
        let v = serde_json::json!({
            "name": ds.name, "source": ds.source, "images": ds.len(),
            "shape": [ds.channels, ds.height, ds.width], "classes": ds.class_names,
            "per_class": counts, "warnings": ds.warnings,
        });
        writeln!(o, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(o, "{}", ds.describe())?;
        for (name, n) in ds.class_names.iter().zip(&counts) {
            writeln!(o, "  {name:<14} {n}")?;
        }
        for w in &ds.warnings {
            eprintln!("warning: {w}");
        }
    }
    emit(&o)
}

fn init(a: &InitArgs) -> Result<()> {
    let mut o = String::new();
    let ds =
        crate::data::load(&a.data, Split::Test, None).context("the dataset fixes the model's input and classes")?;
    if ds.height != ds.width {
        bail!(
            "{} has {}x{} images; models take square images",
            ds.name,
            ds.height,
            ds.width
        );
    }
    let mut config = ModelConfig::new(a.arch, a.kind, ds.channels, ds.height, ds.num_classes());
    config.class_names = ds.class_names.clone();
    if let Some(w) = a.width {
        config.width = w;
    }
    let model = Model::new(config, a.seed, DType::F32, &Device::Cpu)?;
    checkpoint::save(&model, &a.out)?;
    writeln!(
        o,
        "wrote {}: untrained {} {}, {} parameters, seed {}",
        a.out.display(),
        a.kind.name(),
        a.arch.name(),
        model.num_parameters(),
        a.seed
    )?;
    emit(&o)
}
