//! AW-Net and its static baselines: router, weight-varied convolutions, MixBN, backbones,
//! checkpoints and PyTorch import.

pub mod checkpoint;
pub mod conv;
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod direct;
pub mod fused;
pub mod init;
mod lanes;
pub mod layers;
pub mod norm;
mod pair;
pub mod plain;
pub mod pytorch;
pub mod resnet;
pub mod router;
pub mod small_cnn;
mod winograd;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

pub use checkpoint::{CheckpointError, ModelMeta, TrainingState};
pub use router::RouterConfig;

use norm::NormCtx;
use resnet::ResNet18;
use router::Router;
use small_cnn::SmallCnn;

/// Errors from building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("input of shape {found:?} does not fit the model, which takes [b, {c}, {s}, {s}]")]
    InputShape { found: Vec<usize>, c: usize, s: usize },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, ModelError>;

/// The backbone architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// Four 3x3 convolutions, for 28x28 and 32x32 inputs on a CPU.
    SmallCnn,
    /// The CIFAR ResNet-18 of the paper.
    Resnet18,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Self::SmallCnn => "small-cnn",
            Self::Resnet18 => "resnet18",
        }
    }

    pub fn default_width(self) -> usize {
        match self {
            Self::SmallCnn => 32,
            Self::Resnet18 => 64,
        }
    }
}

/// A static network, or AW-Net (router, weight-varied convolutions, MixBN).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    Static,
    Awnet,
}

impl ModelKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::Awnet => "awnet",
        }
    }
}

/// Everything needed to rebuild a model's structure; stored in every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub kind: ModelKind,
    pub in_channels: usize,
    /// Side of the square input image.
    pub image_size: usize,
    pub num_classes: usize,
    /// Base number of filters (32 for the small CNN, 64 for ResNet-18 by default).
    pub width: usize,
    #[serde(default)]
    pub router: RouterConfig,
    /// Names of the classes, in label order; may be empty.
    #[serde(default)]
    pub class_names: Vec<String>,
    #[serde(default = "default_bn_eps")]
    pub bn_eps: f64,
    #[serde(default = "default_bn_momentum")]
    pub bn_momentum: f64,
}

fn default_bn_eps() -> f64 {
    1e-5
}

fn default_bn_momentum() -> f64 {
    0.1
}

impl ModelConfig {
    pub fn new(arch: Arch, kind: ModelKind, in_channels: usize, image_size: usize, num_classes: usize) -> Self {
        Self {
            arch,
            kind,
            in_channels,
            image_size,
            num_classes,
            width: arch.default_width(),
            router: RouterConfig::default(),
            class_names: Vec::new(),
            bn_eps: default_bn_eps(),
            bn_momentum: default_bn_momentum(),
        }
    }

    /// Refuses configurations that cannot be built, or that a hostile file could use to make us
    /// allocate without bound.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if !(1..=4).contains(&self.in_channels) {
            return bad(format!("{} input channels (1 to 4 supported)", self.in_channels));
        }
        if !(2..=1000).contains(&self.num_classes) {
            return bad(format!("{} classes (2 to 1000 supported)", self.num_classes));
        }
        if !(1..=512).contains(&self.width) {
            return bad(format!("width {} (1 to 512 supported)", self.width));
        }
        if !(8..=256).contains(&self.image_size) {
            return bad(format!("image size {} (8 to 256 supported)", self.image_size));
        }
        if self.arch == Arch::SmallCnn && !self.image_size.is_multiple_of(4) {
            return bad(format!(
                "the small CNN pools twice, so its image size must be a multiple of 4, not {}",
                self.image_size
            ));
        }
        if self.router.channels.iter().any(|&c| !(1..=512).contains(&c))
            || !(1..=1024).contains(&self.router.type_hidden)
        {
            return bad(format!(
                "router sizes {:?}/{}",
                self.router.channels, self.router.type_hidden
            ));
        }
        if !(self.router.signal_scale.is_finite() && self.router.signal_scale > 0.0) {
            return bad(format!("signal scale {}", self.router.signal_scale));
        }
        if !(self.bn_eps > 0.0 && self.bn_eps < 1.0 && (0.0..=1.0).contains(&self.bn_momentum)) {
            return bad(format!(
                "batch norm eps {} / momentum {}",
                self.bn_eps, self.bn_momentum
            ));
        }
        if self.class_names.len() > self.num_classes {
            return bad(format!(
                "{} class names for {} classes",
                self.class_names.len(),
                self.num_classes
            ));
        }
        Ok(())
    }

    /// The name of class `i`, or its number.
    pub fn class_name(&self, i: usize) -> String {
        self.class_names.get(i).cloned().unwrap_or_else(|| format!("class {i}"))
    }
}

/// The type of a training batch, which selects the BN of a MixBN pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchType {
    Clean,
    Adversarial,
}

/// How a forward pass runs: inference (running statistics, soft MixBN) or training.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Eval,
    Train(BatchType),
}

/// Everything one forward pass computes.
#[derive(Clone, Debug)]
pub struct Forward {
    /// `[b, classes]`
    pub logits: Tensor,
    /// `[b, 2]` (clean, adversarial) logits of the router's type head; AW-Net only.
    pub type_logits: Option<Tensor>,
    /// Per AW-Net block, `[b, n_j]`; empty for static models.
    pub signals: Vec<Tensor>,
}

impl Forward {
    /// `[b, 2]` type probabilities `(p_clean, p_adv)`.
    pub fn type_probs(&self) -> candle_core::Result<Option<Tensor>> {
        self.type_logits
            .as_ref()
            .map(|t| candle_nn::ops::softmax(t, candle_core::D::Minus1))
            .transpose()
    }
}

/// A convolution as the inspection views see it.
#[derive(Clone, Debug)]
pub struct ConvInfo {
    pub name: String,
    /// `[c_out, c_in, k, k]`
    pub weight: Tensor,
    pub in_size: usize,
    pub out_size: usize,
    /// `(block, offset)`: which signal scales this convolution's filters, from which index.
    pub signal: Option<(usize, usize)>,
}

impl ConvInfo {
    fn new(name: &str, conv: &layers::Conv2d, in_size: usize, signal: Option<(usize, usize)>) -> Self {
        Self {
            name: name.to_string(),
            weight: conv.weight().clone(),
            in_size,
            out_size: conv.out_size(in_size),
            signal,
        }
    }

    /// Multiply-accumulates per image.
    pub fn macs(&self) -> u64 {
        (self.weight.elem_count() * self.out_size * self.out_size) as u64
    }
}

#[derive(Clone, Debug)]
enum Backbone {
    Small(SmallCnn),
    ResNet(ResNet18),
}

/// The network: a backbone, and for AW-Net a router.
#[derive(Clone, Debug)]
pub struct Network {
    backbone: Backbone,
    router: Option<Router>,
    in_channels: usize,
    image_size: usize,
}

impl Network {
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let (c, s) = (config.in_channels, config.image_size);
        let backbone = match config.arch {
            Arch::SmallCnn => Backbone::Small(SmallCnn::new(config, vb.clone())?),
            Arch::Resnet18 => Backbone::ResNet(ResNet18::new(config, vb.clone())?),
        };
        let router = if config.kind == ModelKind::Awnet {
            let sizes = match &backbone {
                Backbone::Small(b) => b.signal_sizes(),
                Backbone::ResNet(b) => b.signal_sizes(),
            };
            Some(Router::new(&config.router, c, &sizes, vb.pp("router"))?)
        } else {
            None
        };
        Ok(Self {
            backbone,
            router,
            in_channels: c,
            image_size: s,
        })
    }

    /// `xs`: `[b, c, s, s]` pixels in [0, 1]. Returns the logits and the router's taps in one pass.
    pub fn forward(&self, xs: &Tensor, mode: Mode) -> Result<Forward> {
        let (_, c, h, w) = xs.dims4().map_err(|_| self.shape_error(xs))?;
        if c != self.in_channels || h != self.image_size || w != self.image_size {
            return Err(self.shape_error(xs));
        }
        let routed = self.router.as_ref().map(|r| r.forward(xs)).transpose()?;
        let p_clean = match (&routed, mode) {
            // Not `softmax_last_dim`: candle 0.11 gives that op no backward, which would cut the
            // input gradient through MixBN's mixing weights.
            (Some(r), Mode::Eval) => {
                Some(candle_nn::ops::softmax(&r.type_logits, candle_core::D::Minus1)?.narrow(1, 0, 1)?)
            }
            _ => None,
        };
        let ctx = NormCtx {
            mode,
            p_clean: p_clean.as_ref(),
        };
        let signals = routed.as_ref().map(|r| r.signals.as_slice());
        let logits = match &self.backbone {
            Backbone::Small(b) => b.forward(xs, signals, &ctx)?,
            Backbone::ResNet(b) => b.forward(xs, signals, &ctx)?,
        };
        let (type_logits, signals) = match routed {
            Some(r) => (Some(r.type_logits), r.signals),
            None => (None, Vec::new()),
        };
        Ok(Forward {
            logits,
            type_logits,
            signals,
        })
    }

    fn shape_error(&self, xs: &Tensor) -> ModelError {
        ModelError::InputShape {
            found: xs.dims().to_vec(),
            c: self.in_channels,
            s: self.image_size,
        }
    }

    /// The backbone's convolutions in forward order.
    pub fn convs(&self) -> Vec<ConvInfo> {
        match &self.backbone {
            Backbone::Small(b) => b.convs(),
            Backbone::ResNet(b) => b.convs(),
        }
    }

    /// Values one image's convolution outputs hold (the input included): the unit that memory
    /// use per image scales with, since every later op of a block is the size of its conv's output.
    pub fn activations_per_image(&self) -> u64 {
        let input = self.in_channels * self.image_size * self.image_size;
        let convs: usize = self
            .convs()
            .iter()
            .map(|c| c.weight.dims()[0] * c.out_size * c.out_size)
            .sum();
        (input + convs) as u64
    }

    /// The final linear layer: its name and weight `[classes, features]`.
    pub fn classifier(&self) -> (&'static str, &Tensor) {
        let (name, linear) = match &self.backbone {
            Backbone::Small(b) => b.classifier(),
            Backbone::ResNet(b) => b.classifier(),
        };
        (name, linear.weight())
    }

    /// Where the weights live.
    pub fn device(&self) -> Device {
        self.classifier().1.device().clone()
    }

    pub fn is_awnet(&self) -> bool {
        self.router.is_some()
    }

    /// The router's `[b, 2]` type logits alone (no backbone), `None` for a static network.
    pub fn type_logits(&self, xs: &Tensor) -> Result<Option<Tensor>> {
        Ok(self
            .router
            .as_ref()
            .map(|r| r.forward(xs))
            .transpose()?
            .map(|r| r.type_logits))
    }

    /// A snapshot of the network for [`plain`]'s hand-written inference and input gradient: the
    /// small CNN (static or AW-Net) and the static ResNet-18, with f32 weights on the CPU; `None`
    /// for anything else.
    pub fn plain(&self) -> Result<Option<plain::Plain>> {
        match &self.backbone {
            Backbone::Small(b) if b.is_cpu_f32() => Ok(Some(plain::Plain::SmallCnn(plain::PlainSmallCnn::new(
                b,
                self.router.as_ref(),
                self.in_channels,
                self.image_size,
            )?))),
            Backbone::ResNet(r) if self.router.is_none() && r.is_cpu_f32() => {
                Ok(plain::PlainResnet::new(r, self.in_channels, self.image_size)?.map(plain::Plain::Resnet))
            }
            _ => Ok(None),
        }
    }
}

/// A device by name: `cpu`, `cuda` (the first GPU) or `cuda:N`. A GPU needs a build with the
/// `cuda` feature; without it, or without the GPU, this is an error that says which.
pub fn device_named(name: &str) -> std::result::Result<Device, String> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.strip_prefix("cuda") {
        Some("") => Some(0),
        Some(rest) => rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()),
        None => None,
    };
    let Some(ordinal) = ordinal else {
        return Err(format!("unknown device {name:?} (expected cpu, cuda or cuda:N)"));
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(format!(
            "device {name}: this build has no CUDA support (build it with `--features cuda`)"
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| format!("cannot open CUDA device {ordinal} ({e})"))
}

/// A model: its configuration, its variables and the network built over them.
pub struct Model {
    pub config: ModelConfig,
    pub varmap: VarMap,
    pub net: Network,
    pub meta: ModelMeta,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// A freshly initialised model; the same seed gives the same weights.
    pub fn new(config: ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let backend = init::SeededVarMap::new(varmap.clone(), seed);
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        let net = Network::new(&config, vb)?;
        Ok(Self {
            config,
            varmap,
            net,
            meta: ModelMeta::default(),
        })
    }

    pub fn forward(&self, xs: &Tensor, mode: Mode) -> Result<Forward> {
        self.net.forward(xs, mode)
    }

    /// The network over detached copies of the weights, for attacks and evaluation: backward
    /// passes through it compute the input gradient without gradients for the parameters.
    /// The copies share storage with the variables, so they see later updates (an attack
    /// crafted mid-training uses the current weights); clone the var map for a snapshot.
    pub fn frozen(&self) -> Result<Network> {
        let vars = self.named_vars();
        let dtype = vars.first().map(|(_, v)| v.dtype()).unwrap_or(DType::F32);
        let tensors = vars.into_iter().map(|(n, v)| (n, v.as_detached_tensor())).collect();
        Network::new(&self.config, VarBuilder::from_tensors(tensors, dtype, &self.device()))
    }

    /// Where the weights live.
    pub fn device(&self) -> Device {
        self.net.device()
    }

    /// The same model with its variables on `device`: itself where they are there already, else
    /// [`Model::to_device`]'s copy.
    pub fn into_device(self, device: &Device) -> Result<Self> {
        if self.device().same_device(device) {
            return Ok(self);
        }
        self.to_device(device)
    }

    /// A copy of this model, its variables on `device` (their own storage, even on the same
    /// device).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let vars = self.named_vars();
        let dtype = vars.first().map(|(_, v)| v.dtype()).unwrap_or(DType::F32);
        let moved = Self::new(self.config.clone(), 0, dtype, device)?;
        let mut targets: BTreeMap<String, candle_core::Var> = moved.named_vars().into_iter().collect();
        for (name, var) in vars {
            let target = targets
                .remove(&name)
                .ok_or_else(|| ModelError::Config(format!("variable {name} missing on {device:?}")))?;
            target.set(&var.as_tensor().to_device(device)?)?;
        }
        Ok(Self {
            meta: self.meta.clone(),
            ..moved
        })
    }

    /// Named variables, sorted by name.
    pub fn named_vars(&self) -> Vec<(String, candle_core::Var)> {
        let data = self.varmap.data().lock().expect("var map lock poisoned");
        let mut vars: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Number of trainable parameters (running statistics excluded).
    pub fn num_parameters(&self) -> usize {
        self.named_vars()
            .iter()
            .filter(|(n, _)| !is_running_stat(n))
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// Multiply-accumulates per image: backbone convolutions, classifier and (AW-Net) router.
    pub fn macs_per_image(&self) -> u64 {
        let convs: u64 = self.net.convs().iter().map(ConvInfo::macs).sum();
        let fc = self.net.classifier().1.elem_count() as u64;
        let router = if self.net.is_awnet() {
            let r = &self.config.router;
            let s = self.config.image_size;
            let s2 = s.div_ceil(2);
            let s4 = s2.div_ceil(2);
            let [c1, c2, c3] = r.channels;
            let signals: usize = self
                .net
                .convs()
                .iter()
                .filter(|c| c.signal.is_some())
                .map(|c| c.weight.dims()[0])
                .sum();
            (9 * (self.config.in_channels * c1 * s * s + c1 * c2 * s2 * s2 + c2 * c3 * s4 * s4)
                + c3 * r.type_hidden
                + 2 * r.type_hidden
                + c3 * signals) as u64
        } else {
            0
        };
        convs + fc + router
    }
}

/// BatchNorm running statistics are variables too, but get no gradient.
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}
