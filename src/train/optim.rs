//! Optimizers with PyTorch's semantics: SGD with momentum and (coupled) weight decay, as
//! `torch.optim.SGD`; AdamW, as `torch.optim.AdamW`. Variables without a gradient (BatchNorm
//! running statistics) are skipped, and every stored buffer is detached so no step's graph
//! stays alive.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::{Model, is_running_stat};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    Sgd,
    Adamw,
}

pub struct Optimizer {
    kind: OptimizerKind,
    vars: Vec<(String, Var)>,
    /// SGD: `buf.<name>`; AdamW: `m.<name>` and `v.<name>`.
    buffers: BTreeMap<String, Tensor>,
    pub steps: usize,
    momentum: f64,
    weight_decay: f64,
}

impl Optimizer {
    pub fn new(model: &Model, kind: OptimizerKind, momentum: f64, weight_decay: f64) -> Self {
        let vars = model
            .named_vars()
            .into_iter()
            .filter(|(n, _)| !is_running_stat(n))
            .collect();
        Self {
            kind,
            vars,
            buffers: BTreeMap::new(),
            steps: 0,
            momentum,
            weight_decay,
        }
    }

    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for (name, var) in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = g.detach();
            let p = var.as_detached_tensor();
            match self.kind {
                OptimizerKind::Sgd => {
                    let key = format!("buf.{name}");
                    let buf = self.buffers.get(&key).filter(|_| self.momentum != 0.0);
                    if in_place(var.as_tensor(), &g, buf) {
                        let (m, wd) = (self.momentum as f32, self.weight_decay as f32);
                        let descend = |d: &Tensor, wd| var.as_tensor().inplace_op2(d, &Descend { lr: lr as f32, wd });
                        match buf {
                            Some(buf) => {
                                buf.inplace_op3(&g, var.as_tensor(), &Momentum { m, wd })?;
                                descend(buf, 0.0)?;
                            }
                            None if self.momentum == 0.0 => descend(&g, wd)?,
                            None => {
                                // The first buffer is `g + wd p`, in storage of its own.
                                let d = (&g + (&p * self.weight_decay)?)?.copy()?;
                                descend(&d, 0.0)?;
                                self.buffers.insert(key, d);
                            }
                        }
                        continue;
                    }
                    let d = if self.weight_decay != 0.0 {
                        (g + (&p * self.weight_decay)?)?
                    } else {
                        g
                    };
                    let d = if self.momentum == 0.0 {
                        d
                    } else {
                        let d = match self.buffers.get(&key) {
                            Some(buf) => ((buf * self.momentum)? + d)?,
                            None => d,
                        };
                        self.buffers.insert(key, d.clone());
                        d
                    };
                    var.set(&(p - (d * lr)?)?)?;
                }
                OptimizerKind::Adamw => {
                    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
                    let zeros = || g.zeros_like();
                    let m = self.buffers.get(&format!("m.{name}")).cloned().map_or_else(zeros, Ok)?;
                    let v = self.buffers.get(&format!("v.{name}")).cloned().map_or_else(zeros, Ok)?;
                    let m = ((m * b1)? + (&g * (1.0 - b1))?)?;
                    let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                    let m_hat = (&m / (1.0 - b1.powi(t)))?;
                    let v_hat = (&v / (1.0 - b2.powi(t)))?;
                    let p = (p * (1.0 - lr * self.weight_decay))?;
                    let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
                    var.set(&(p - (update * lr)?)?)?;
                    self.buffers.insert(format!("m.{name}"), m);
                    self.buffers.insert(format!("v.{name}"), v);
                }
            }
        }
        Ok(())
    }

    /// The buffers, for a checkpoint.
    pub fn state(&self) -> &BTreeMap<String, Tensor> {
        &self.buffers
    }

    /// Restores buffers from a checkpoint; each must belong to a variable of this model.
    pub fn restore(&mut self, buffers: BTreeMap<String, Tensor>, steps: usize) -> std::result::Result<(), String> {
        for (key, t) in &buffers {
            let name = key.split_once('.').map(|(_, n)| n).unwrap_or("");
            match self.vars.iter().find(|(n, _)| n == name) {
                Some((_, v)) if v.dims() == t.dims() => {}
                _ => return Err(format!("optimizer buffer {key} does not fit the model")),
            }
        }
        self.buffers = buffers;
        self.steps = steps;
        Ok(())
    }
}

/// Whether SGD's step can run as [`Momentum`] and [`Descend`] in place: f32 on the CPU, every
/// tensor contiguous. Elsewhere candle's ops compute the same step (six passes over each
/// parameter, one of them on one thread, and a copy into the variable: 50-80 ms of a ResNet-18
/// step on the 2-core host, against about 15 ms in place).
fn in_place(p: &Tensor, g: &Tensor, buf: Option<&Tensor>) -> bool {
    [Some(p), Some(g), buf]
        .into_iter()
        .flatten()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// Values each rayon task of an in-place step takes.
const CHUNK: usize = 1 << 15;

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("optimizer step: a strided tensor".into()))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

fn contiguous_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("optimizer step: a strided tensor".into()))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        _ => Err(candle_core::Error::Msg("optimizer step: f32 only".into())),
    }
}

/// `buf <- m buf + g + wd p`, in place on the momentum buffer, with `(g, p)`.
struct Momentum {
    m: f32,
    wd: f32,
}

impl InplaceOp3 for Momentum {
    fn name(&self) -> &'static str {
        "awnet-sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (buf, g, p) = (contiguous_mut(s1, l1)?, contiguous(s2, l2)?, contiguous(s3, l3)?);
        if g.len() != buf.len() || p.len() != buf.len() {
            candle_core::bail!(
                "optimizer step: {} values, gradient {}, parameter {}",
                buf.len(),
                g.len(),
                p.len()
            )
        }
        let (m, wd) = (self.m, self.wd);
        buf.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(p.par_chunks(CHUNK)))
            .for_each(|(b, (g, p))| {
                for ((b, &g), &p) in b.iter_mut().zip(g).zip(p) {
                    *b = m * *b + (g + wd * p);
                }
            });
        Ok(())
    }
}

/// `p <- p - lr (d + wd p)`, in place on the parameter, with the step's direction `d`.
struct Descend {
    lr: f32,
    wd: f32,
}

impl InplaceOp2 for Descend {
    fn name(&self) -> &'static str {
        "awnet-sgd-descend"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (p, d) = (contiguous_mut(s1, l1)?, contiguous(s2, l2)?);
        if d.len() != p.len() {
            candle_core::bail!("optimizer step: {} values, direction {}", p.len(), d.len())
        }
        let (lr, wd) = (self.lr, self.wd);
        p.par_chunks_mut(CHUNK).zip(d.par_chunks(CHUNK)).for_each(|(p, d)| {
            for (p, &d) in p.iter_mut().zip(d) {
                *p -= lr * (d + wd * *p);
            }
        });
        Ok(())
    }
}
