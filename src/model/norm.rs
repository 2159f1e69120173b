//! Normalisation that is a single BatchNorm for static models and MixBN for AW-Net.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::BatchNorm;
use super::{BatchType, Mode};

/// What a normalisation layer needs to know about the current forward pass.
#[derive(Clone, Copy, Debug)]
pub struct NormCtx<'a> {
    pub mode: Mode,
    /// The router's `p_clean` per sample, `[b, 1]`; present for AW-Net in eval mode.
    pub p_clean: Option<&'a Tensor>,
}

/// A BatchNorm, or MixBN: a (clean, adversarial) pair with separate affine parameters and
/// running statistics.
#[derive(Clone, Debug)]
pub enum Norm {
    Single(BatchNorm),
    Mix { clean: BatchNorm, adv: BatchNorm },
}

impl Norm {
    /// A single BN under `vb`, or a pair under `vb.clean` and `vb.adv`.
    pub fn new(channels: usize, mix: bool, eps: f64, momentum: f64, vb: VarBuilder) -> Result<Self> {
        if mix {
            Ok(Self::Mix {
                clean: BatchNorm::new(channels, eps, momentum, vb.pp("clean"))?,
                adv: BatchNorm::new(channels, eps, momentum, vb.pp("adv"))?,
            })
        } else {
            Ok(Self::Single(BatchNorm::new(channels, eps, momentum, vb)?))
        }
    }

    /// Training: batch statistics of the BN that the batch's known type selects.
    /// Inference: `p_clean * BN_clean(z) + p_adv * BN_adv(z)` per sample, both in eval mode.
    pub fn forward(&self, xs: &Tensor, ctx: &NormCtx) -> Result<Tensor> {
        match (self, self.training_bn(ctx)) {
            (_, Some(bn)) => bn.forward_train(xs, None, false),
            (Self::Single(bn), None) => bn.forward_eval(xs),
            (Self::Mix { clean, adv }, None) => {
                let p_clean = ctx
                    .p_clean
                    .ok_or_else(|| candle_core::Error::Msg("MixBN needs type probabilities".into()))?;
                let (scale, shift) = mix_affine(clean, adv, p_clean)?;
                let (b, c) = scale.dims2()?;
                xs.broadcast_mul(&scale.reshape((b, c, 1, 1))?)?
                    .broadcast_add(&shift.reshape((b, c, 1, 1))?)
            }
        }
    }

    /// `relu(self.forward(xs, ctx))`, fused into one pass each way.
    pub fn forward_relu(&self, xs: &Tensor, ctx: &NormCtx) -> Result<Tensor> {
        match (self.training_bn(ctx), self.eval_affine(ctx)?) {
            (Some(bn), _) => bn.forward_train(xs, None, true),
            (None, Some((scale, shift))) => super::fused::affine_relu(xs, &scale, &shift),
            (None, None) => {
                candle_core::bail!("normalisation has neither batch statistics nor an eval-mode affine form")
            }
        }
    }

    /// In training mode, the BN that normalises this batch: the single one, or MixBN's half
    /// that the batch's known type selects.
    fn training_bn(&self, ctx: &NormCtx) -> Option<&BatchNorm> {
        match (self, ctx.mode) {
            (Self::Single(bn), Mode::Train(_)) => Some(bn),
            (Self::Mix { clean, .. }, Mode::Train(BatchType::Clean)) => Some(clean),
            (Self::Mix { adv, .. }, Mode::Train(BatchType::Adversarial)) => Some(adv),
            (_, Mode::Eval) => None,
        }
    }
}

impl Norm {
    /// `self(z * signal)`, then a ReLU when `relu`: a weight-varied convolution's output (AW-Net's
    /// per-sample channel signals) through its normalisation. In eval mode the normalisation is
    /// affine, so the signal folds into its scale and the tail is one fused pass (two without the
    /// ReLU); in training mode the batch-statistics passes scale by the signal as they read `z`.
    pub fn forward_scaled(&self, z: &Tensor, signal: Option<&Tensor>, relu: bool, ctx: &NormCtx) -> Result<Tensor> {
        if let Some(bn) = self.training_bn(ctx) {
            return bn.forward_train(z, signal, relu);
        }
        let Some((scale, shift)) = self.eval_affine(ctx)? else {
            candle_core::bail!("normalisation has neither batch statistics nor an eval-mode affine form")
        };
        let (scale, shift) = match signal {
            Some(s) if scale.rank() == 1 => (
                s.broadcast_mul(&scale.unsqueeze(0)?)?,
                shift.unsqueeze(0)?.repeat((s.dim(0)?, 1))?,
            ),
            Some(s) => (s.mul(&scale)?, shift),
            None => (scale, shift),
        };
        if relu {
            return super::fused::affine_relu(z, &scale, &shift);
        }
        let (b, c) = (z.dim(0)?, z.dim(1)?);
        let shape = if scale.rank() == 2 { (b, c, 1, 1) } else { (1, c, 1, 1) };
        z.broadcast_mul(&scale.reshape(shape)?)?
            .broadcast_add(&shift.reshape(shape)?)
    }

    /// In eval mode, the normalisation as `z * scale + shift`: `[c]` coefficients for a single
    /// BN, `[b, c]` for MixBN's soft mix; `None` in training mode.
    pub fn eval_affine(&self, ctx: &NormCtx) -> Result<Option<(Tensor, Tensor)>> {
        match (self, ctx.mode) {
            (_, Mode::Train(_)) => Ok(None),
            (Self::Single(bn), Mode::Eval) => bn.affine().map(Some),
            (Self::Mix { clean, adv }, Mode::Eval) => {
                let p_clean = ctx
                    .p_clean
                    .ok_or_else(|| candle_core::Error::Msg("MixBN needs type probabilities".into()))?;
                mix_affine(clean, adv, p_clean).map(Some)
            }
        }
    }
}

/// Per-sample affine form of the soft mix, `[b, c]` each. Both eval-mode BNs are affine, so the
/// mix is affine with mixed coefficients. Written as `adv + p_clean * (clean - adv)` so that two
/// equal BNs give exactly the single BN's coefficients.
fn mix_affine(clean: &BatchNorm, adv: &BatchNorm, p_clean: &Tensor) -> Result<(Tensor, Tensor)> {
    let (sc, hc) = clean.affine()?;
    let (sa, ha) = adv.affine()?;
    let mix = |a: &Tensor, c: &Tensor| -> Result<Tensor> {
        p_clean
            .broadcast_mul(&(c - a)?.unsqueeze(0)?)?
            .broadcast_add(&a.unsqueeze(0)?)
    };
    Ok((mix(&sa, &sc)?, mix(&ha, &hc)?))
}
