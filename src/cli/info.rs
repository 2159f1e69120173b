//! `awnet info`

use std::fmt::Write as _;

use anyhow::Result;
use serde_json::json;

use super::{InfoArgs, open_model};
use crate::model::{Model, is_running_stat};

/// One row per variable: name, shape, count.
fn layer_rows(model: &Model) -> Vec<(String, Vec<usize>, usize)> {
    model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.dims().to_vec(), v.elem_count()))
        .collect()
}

pub fn run(a: &InfoArgs) -> Result<()> {
    let mut o = String::new();
    let model = open_model(&a.model)?;
    let c = &model.config;
    let (path, hash) = model.meta.file.clone().unwrap_or_default();
    let params = model.num_parameters();
    let router_params: usize = model
        .named_vars()
        .iter()
        .filter(|(n, _)| n.starts_with("router.") && !is_running_stat(n))
        .map(|(_, v)| v.elem_count())
        .sum();
    let macs = model.macs_per_image();
    if a.json {
        let layers: Vec<_> = layer_rows(&model)
            .into_iter()
            .map(|(name, shape, n)| json!({"name": name, "shape": shape, "parameters": n, "trainable": !is_running_stat(&name)}))
            .collect();
        let v = json!({
            "file": path, "sha256": hash, "config": c, "parameters": params,
            "router_parameters": router_params, "macs_per_image": macs,
            "training": model.meta.training, "log_summary": model.meta.log_summary,
            "metrics": model.meta.metrics, "origin": model.meta.origin, "written_by": model.meta.written_by,
            "layers": layers,
        });
        writeln!(o, "{}", serde_json::to_string_pretty(&v)?)?;
        return super::emit(&o);
    }
    writeln!(o, "model        {}", path.display())?;
    writeln!(o, "sha256       {hash}")?;
    writeln!(
        o,
        "architecture {}, {}, width {}",
        c.arch.name(),
        c.kind.name(),
        c.width
    )?;
    writeln!(
        o,
        "input        {}x{}x{} in [0, 1], {} classes",
        c.in_channels, c.image_size, c.image_size, c.num_classes
    )?;
    if model.net.is_awnet() {
        let r = &c.router;
        writeln!(
            o,
            "router       convs {:?}, type head hidden {}, omega = {} * sigmoid(z); {} parameters",
            r.channels, r.type_hidden, r.signal_scale, router_params
        )?;
    }
    writeln!(
        o,
        "parameters   {params} trainable; {:.2} M multiply-accumulates per image",
        macs as f64 / 1e6
    )?;
    match &model.meta.training {
        Some(t) => writeln!(o, "training     {t}")?,
        None => writeln!(
            o,
            "training     none recorded{}",
            model
                .meta
                .origin
                .as_ref()
                .map(|o| format!(" ({o})"))
                .unwrap_or_else(|| " (freshly initialised)".into())
        )?,
    }
    match &model.meta.metrics {
        Some(m) => writeln!(o, "metrics      {m}")?,
        None => writeln!(o, "metrics      none measured")?,
    }
    if !c.class_names.is_empty() {
        writeln!(o, "classes      {}", c.class_names.join(", "))?;
    }
    writeln!(o, "layers:")?;
    for (name, shape, n) in layer_rows(&model) {
        let note = if is_running_stat(&name) {
            "  (running statistic)"
        } else {
            ""
        };
        writeln!(o, "  {name:<40} {:<20} {n:>9}{note}", format!("{shape:?}"))?;
    }
    super::emit(&o)
}
