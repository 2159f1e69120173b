//! The primitive layers every backbone is built from, owned here so that faster kernels can
//! replace them in one place.
//!
//! Two candle 0.11 traps are worked around here: `max_pool2d`'s backward scales the gradient by
//! `1/(k*k)`, so pooling is a reshape and a `max`; and `candle_nn::BatchNorm` is replaced by one
//! that exposes its eval-mode affine form, which MixBN mixes per sample.

use candle_core::{Result, Tensor, Var};
use candle_nn::{Init, VarBuilder, init};

/// A 2-D convolution, `[b, c_in, h, w] -> [b, c_out, h', w']`, square kernel, optional bias.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Weight `[c_out, c_in, k, k]` named `weight`, Kaiming-normal (fan-in, ReLU gain).
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((c_out, c_in, kernel, kernel), "weight", init::DEFAULT_KAIMING_NORMAL)?;
        let bias = if bias {
            Some(vb.get_with_hints(c_out, "bias", init::ZERO)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = super::conv::conv2d(xs, &self.weight, self.stride, self.padding)?;
        match &self.bias {
            Some(b) => ys.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(ys),
        }
    }

    /// `relu(self.forward(xs))`, the convolution, bias and ReLU as one op (`conv2d_bias_relu`):
    /// candle's backward of the broadcast bias is a single-threaded sum over the whole output,
    /// most of the router's cost in an AW-Net training step.
    pub fn forward_relu(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => super::conv::conv2d_bias_relu(xs, &self.weight, b, self.stride, self.padding),
            None => super::conv::conv2d(xs, &self.weight, self.stride, self.padding)?.relu(),
        }
    }

    /// `[c_out, c_in, k, k]`
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    pub fn padding(&self) -> usize {
        self.padding
    }

    /// `[c_out]`, when the convolution has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Output side length for an input side length.
    pub fn out_size(&self, size: usize) -> usize {
        let k = self.weight.dims()[3];
        (size + 2 * self.padding - k) / self.stride + 1
    }
}

/// A fully connected layer, `[b, in] -> [b, out]`.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// PyTorch's default: uniform in `±1/sqrt(in)` for the weight, zero bias.
    pub fn new(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Self> {
        let bound = 1.0 / (d_in as f64).sqrt();
        Self::with_init(d_in, d_out, Init::Uniform { lo: -bound, up: bound }, vb)
    }

    /// Weight and bias both zero (the router's signal heads start every signal at exactly 1).
    pub fn zeros(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Self> {
        Self::with_init(d_in, d_out, init::ZERO, vb)
    }

    fn with_init(d_in: usize, d_out: usize, w_init: Init, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((d_out, d_in), "weight", w_init)?;
        let bias = vb.get_with_hints(d_out, "bias", init::ZERO)?;
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }

    /// `[out, in]`
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `[out]`
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

/// Batch normalisation over `[b, c, h, w]` with running statistics, as PyTorch's `BatchNorm2d`.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    /// Variables in a trainable model; detached tensors sharing their storage in a frozen one.
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    pub fn new(channels: usize, eps: f64, momentum: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", init::ONE)?;
        let bias = vb.get_with_hints(channels, "bias", init::ZERO)?;
        let running_mean = vb.get_with_hints(channels, "running_mean", init::ZERO)?;
        let running_var = vb.get_with_hints(channels, "running_var", init::ONE)?;
        Ok(Self {
            weight,
            bias,
            running_mean,
            running_var,
            eps,
            momentum,
        })
    }

    /// Eval mode as a per-channel affine map: returns `(scale, shift)`, both `[c]`, with
    /// `bn(z) = z * scale + shift`.
    pub fn affine(&self) -> Result<(Tensor, Tensor)> {
        let scale = self.weight.div(&(&self.running_var + self.eps)?.sqrt()?)?;
        let shift = self.bias.sub(&self.running_mean.mul(&scale)?)?;
        Ok((scale, shift))
    }

    pub fn forward_eval(&self, xs: &Tensor) -> Result<Tensor> {
        let (scale, shift) = self.affine()?;
        xs.broadcast_mul(&scale.reshape((1, (), 1, 1))?)?
            .broadcast_add(&shift.reshape((1, (), 1, 1))?)
    }

    /// Normalises `xs`, times AW-Net's per-sample channel `signal` (`[b, c]`) when there is one,
    /// with the batch statistics and moves the running statistics towards them (PyTorch's
    /// update: unbiased variance, `momentum` weight on the new value). With `relu`, returns
    /// `relu` of the normalised values, in the same pass.
    pub fn forward_train(&self, xs: &Tensor, signal: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let n = b * h * w;
        if n < 2 {
            candle_core::bail!("batch norm in train mode needs more than one value per channel");
        }
        let fused = super::fused::batch_norm_train(xs, signal, &self.weight, &self.bias, self.eps, relu)?;
        let (ys, mean, var) = match fused {
            Some(fused) => fused,
            None => {
                let xs = match signal {
                    Some(s) => scale_channels(xs, s)?,
                    None => xs.clone(),
                };
                let per_channel = xs.transpose(0, 1)?.reshape((c, n))?;
                let mean = per_channel.mean_keepdim(1)?; // [c, 1]
                let centred = per_channel.broadcast_sub(&mean)?;
                let var = centred.sqr()?.mean_keepdim(1)?; // biased, for normalising
                let normed = centred.broadcast_div(&(var.clone() + self.eps)?.sqrt()?)?;
                let ys = normed
                    .broadcast_mul(&self.weight.reshape((c, 1))?)?
                    .broadcast_add(&self.bias.reshape((c, 1))?)?
                    .reshape((c, b, h, w))?
                    .transpose(0, 1)?
                    .contiguous()?;
                let ys = if relu { ys.relu()? } else { ys };
                (ys, mean, var)
            }
        };
        if !self.running_mean.is_variable() || !self.running_var.is_variable() {
            candle_core::bail!("a frozen network cannot run batch norm in train mode");
        }
        let m = self.momentum;
        let unbiased = (var.detach().flatten_all()? * (n as f64 / (n - 1) as f64))?;
        let new_mean = ((self.running_mean.detach() * (1.0 - m))? + (mean.detach().flatten_all()? * m)?)?;
        let new_var = ((self.running_var.detach() * (1.0 - m))? + (unbiased * m)?)?;
        // Wrapping a variable shares its storage, so `set` updates the model's var map.
        Var::from_tensor(&self.running_mean)?.set(&new_mean)?;
        Var::from_tensor(&self.running_var)?.set(&new_var)?;
        Ok(ys)
    }
}

/// Scales output channel `i` of sample `b` by `signal[b, i]`: `[b, c, h, w] x [b, c]`.
///
/// For a bias-free convolution this equals convolving sample `b` with filters
/// `W * signal[b]`, at the cost of one multiply. Training-mode BatchNorm takes the signal into its
/// own passes (`BatchNorm::forward_train`); this is the plain form for other tensors and tests.
pub fn scale_channels(ys: &Tensor, signal: &Tensor) -> Result<Tensor> {
    let (b, c, _, _) = ys.dims4()?;
    if signal.dims() != [b, c] {
        candle_core::bail!("scale_channels: signal {:?} for input {:?}", signal.dims(), ys.dims());
    }
    ys.broadcast_mul(&signal.reshape((b, c, 1, 1))?)
}

/// 2x2 max pooling with stride 2, `[b, c, h, w] -> [b, c, h/2, w/2]`; `h` and `w` must be even.
/// Not candle's `max_pool2d`, whose backward scales gradients by 1/4 (see `fused`).
pub fn max_pool2x2(xs: &Tensor) -> Result<Tensor> {
    super::fused::max_pool2x2(xs)
}

/// Mean over the spatial axes, `[b, c, h, w] -> [b, c]`.
pub fn global_avg_pool(xs: &Tensor) -> Result<Tensor> {
    super::fused::global_avg_pool(xs)
}
