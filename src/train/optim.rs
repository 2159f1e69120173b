//! Optimizers with PyTorch's semantics: SGD with momentum and (coupled) weight decay, as
//! `torch.optim.SGD`; AdamW, as `torch.optim.AdamW`. Variables without a gradient (BatchNorm
//! running statistics) are skipped, and every stored buffer is detached so no step's graph
//! stays alive.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
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
                    let d = if self.weight_decay != 0.0 {
                        (g + (&p * self.weight_decay)?)?
                    } else {
                        g
                    };
                    let d = if self.momentum == 0.0 {
                        d
                    } else {
                        let key = format!("buf.{name}");
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
