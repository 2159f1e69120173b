//! The window, driven headless with egui_kittest: buttons emit commands, fake worker events
//! draw the run, errors become notifications. No real training runs here.

use std::path::PathBuf;
use std::time::Duration;

use awnet_lab::gui::worker::{Event, PickPurpose, TrainRequest};
use awnet_lab::gui::{App, Command, Settings, StartOptions, Tab};
use awnet_lab::train::{EpochReport, StepReport, TrainEvent};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;

fn harness(app: App) -> Harness<'static, App> {
    Harness::builder()
        .with_size([1280.0, 800.0])
        .build_ui_state(|ui, app: &mut App| app.show(ui), app)
}

fn dry_app() -> App {
    App::dry(StartOptions {
        models: vec![PathBuf::from("models/standard.safetensors")],
        tab: Some(Tab::Train),
        screenshot: None,
    })
}

fn step(k: usize, loss: f64) -> TrainEvent {
    TrainEvent::Step(StepReport {
        epoch: 0,
        step: k,
        steps_per_epoch: 10,
        global_step: k + 1,
        lr: 0.05,
        loss,
        terms: vec![("ce".into(), loss)],
        balance: None,
        images_per_second: 250.0,
    })
}

fn epoch(e: usize, clean: f64, robust: f64) -> TrainEvent {
    TrainEvent::Epoch(EpochReport {
        epoch: e,
        lr: 0.05,
        train_loss: 1.0,
        clean_accuracy: clean,
        robust_accuracy: robust,
        robust_label: "PGD-10 (test label)".into(),
        w_robust: (clean + robust) / 2.0,
        router_auc: None,
        router_type_accuracy: None,
        adaptive_accuracy: None,
        router_auc_adaptive: None,
        worst_accuracy: None,
        monitor: "held out".into(),
        images_per_second: 250.0,
        seconds: 1.0,
        eta_seconds: 0.0,
    })
}

#[test]
fn train_tab_buttons_emit_start_and_stop() {
    let mut h = harness(dry_app());
    h.run_steps(4);
    h.get_by_label("Start").click();
    h.run_steps(4);
    let starts: Vec<_> = h
        .state()
        .sent
        .iter()
        .filter(|c| matches!(c, Command::StartTraining(TrainRequest::New { .. })))
        .collect();
    assert_eq!(starts.len(), 1, "{:?}", h.state().sent);
    assert!(!h.state().sent.contains(&Command::StopTraining));

    // Stop is enabled once the run has started.
    h.state_mut().inject(Event::Train(TrainEvent::Started {
        epochs: 1,
        steps_per_epoch: 10,
        resumed_at: None,
    }));
    h.run_steps(4);
    h.get_by_label("Stop").click();
    h.run_steps(4);
    assert!(h.state().sent.contains(&Command::StopTraining));
}

#[test]
fn a_bad_form_is_a_notification_not_a_start() {
    let mut app = dry_app();
    app.settings.train.eps = "eight".into();
    let mut h = harness(app);
    h.run_steps(4);
    h.get_by_label("Start").click();
    h.run_steps(4);
    let sent = &h.state().sent;
    assert!(
        sent.iter()
            .any(|c| matches!(c, Command::Notify(m) if m.contains("eps"))),
        "{sent:?}"
    );
    assert!(!sent.iter().any(|c| matches!(c, Command::StartTraining(_))));
}

#[test]
fn fake_training_events_draw_the_run() {
    let mut h = harness(dry_app());
    h.run_steps(4);
    h.state_mut().inject(Event::Train(TrainEvent::Started {
        epochs: 2,
        steps_per_epoch: 10,
        resumed_at: None,
    }));
    for k in 0..4 {
        h.state_mut().inject(Event::Train(step(k, 2.0 - 0.1 * k as f64)));
    }
    h.state_mut().inject(Event::Train(epoch(0, 0.7, 0.2)));
    h.run_steps(4);
    let run = h.state().run.as_ref().expect("the events start a run");
    assert_eq!(run.steps.len(), 4);
    assert_eq!(run.epochs.len(), 1);
    // The progress bar and the status bar show the newest step.
    h.get_by_label_contains("epoch 1 step 4/10");
    h.get_by_label_contains("training: epoch 1, step 4/10, 250 img/s");
    h.get_by_label_contains("robust: PGD-10 (test label)");
    // The same epoch again replaces the point instead of adding one.
    h.state_mut().inject(Event::Train(epoch(0, 0.72, 0.21)));
    h.run_steps(4);
    assert_eq!(h.state().run.as_ref().unwrap().epochs.len(), 1);
}

#[test]
fn an_error_event_shows_a_notification() {
    let mut h = harness(dry_app());
    h.run_steps(4);
    h.state_mut().inject(Event::TrainFailed(
        "training stopped: the loss became NaN at epoch 0, step 3".into(),
    ));
    h.run_steps(4);
    h.get_by_label_contains("the loss became NaN");
    assert!(!h.state().is_training());
}

/// A corrupt model file, opened through the same command as the file dialog and drag-and-drop,
/// becomes a notification naming the file, and the window keeps working.
#[test]
fn opening_a_corrupt_model_is_a_notification() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.safetensors");
    std::fs::write(&bad, b"not a safetensors file at all").unwrap();
    let app = App::new(
        StartOptions {
            models: vec![bad.clone()],
            tab: Some(Tab::Train),
            screenshot: None,
        },
        None,
        None,
    );
    let mut h = harness(app);
    for _ in 0..500 {
        h.step();
        if !h.state().notifications.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let n = &h.state().notifications;
    assert_eq!(n.len(), 1, "{n:?}");
    assert!(n[0].error && n[0].text.contains("broken.safetensors"), "{}", n[0].text);
    assert!(h.state().models.is_empty());
    h.run_steps(4);
    h.get_by_label("Start");
}

/// Training data that cannot be found (here a missing folder; on a machine without Debian's
/// full Fashion-MNIST, the default) is said in the data panel at start, not raised as an error;
/// choosing it again through the folder dialog is an error notification.
#[test]
fn missing_training_data_is_quiet_at_start_and_an_error_when_chosen() {
    let missing = std::env::temp_dir().join("awnet-no-such-data-folder");
    let settings = Settings {
        data: missing.display().to_string(),
        ..Settings::default()
    };
    let app = App::new(
        StartOptions {
            models: vec![PathBuf::from("models/standard.safetensors")],
            tab: Some(Tab::Train),
            screenshot: None,
        },
        Some(settings),
        None,
    );
    let mut h = harness(app);
    let settle = |h: &mut Harness<'static, App>| {
        for _ in 0..500 {
            h.step();
            if h.state().data_description.is_some() && !h.state().models.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    settle(&mut h);
    let Some(Err(why)) = &h.state().data_description else {
        panic!("{:?}", h.state().data_description)
    };
    assert!(why.contains("awnet-no-such-data-folder"), "{why}");
    assert!(h.state().notifications.is_empty(), "{:?}", h.state().notifications);
    h.get_by_label_contains("cannot use the data");
    h.state_mut()
        .inject(Event::Picked(PickPurpose::DataFolder, Some(missing.clone())));
    h.state_mut().data_description = None;
    h.run_steps(2);
    settle(&mut h);
    let n = &h.state().notifications;
    assert_eq!(n.len(), 1, "{n:?}");
    assert!(
        n[0].error && n[0].text.contains("awnet-no-such-data-folder"),
        "{}",
        n[0].text
    );
}

/// Every model file of the malformed corpus, opened at once through the file dialog's command:
/// one notification per file, naming it, and the window keeps working.
#[test]
fn every_corrupt_model_of_the_corpus_is_a_notification() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/malformed");
    let files: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("model-"))
        .collect();
    assert!(files.len() >= 15, "{files:?}");
    let app = App::new(
        StartOptions {
            models: files.clone(),
            tab: Some(Tab::Filters),
            screenshot: None,
        },
        None,
        None,
    );
    let mut h = harness(app);
    for _ in 0..1000 {
        h.step();
        if h.state().notifications.len() >= files.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let n = &h.state().notifications;
    assert_eq!(n.len(), files.len(), "{n:?}");
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(
            n.iter().any(|x| x.error && x.text.contains(name.as_ref())),
            "no notification names {name}"
        );
    }
    assert!(h.state().models.is_empty());
    h.run_steps(4);
    h.get_by_label("Train").click();
    h.run_steps(4);
    h.get_by_label("Start");
}

fn wait_for_notification(h: &mut Harness<'static, App>, count: usize) {
    for _ in 0..1000 {
        h.step();
        if h.state().notifications.len() >= count {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no notification came: {:?}", h.state().notifications);
}

/// Right-click > "Export this plot…" writes that plot alone (the figure names the tab's plots use
/// exist), and a folder that cannot be written is an error notification with nothing written.
#[test]
fn one_plot_exports_alone_and_a_failed_export_is_a_notification() {
    use awnet_lab::gui::worker::PickPurpose;
    let mut h = harness(dry_app());
    h.run_steps(2);
    h.state_mut().inject(Event::Train(TrainEvent::Started {
        epochs: 1,
        steps_per_epoch: 10,
        resumed_at: None,
    }));
    for k in 0..5 {
        h.state_mut().inject(Event::Train(step(k, 2.0 - 0.1 * k as f64)));
    }
    h.state_mut().inject(Event::Train(epoch(0, 0.7, 0.2)));
    h.run_steps(4);
    let names: Vec<String> = h.state().tab_figures().0.into_iter().map(|f| f.name).collect();
    for want in ["train-loss", "train-accuracy", "train-lr", "train-trade-off"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }

    let dir = tempfile::tempdir().unwrap();
    h.state_mut().export_only = Some("train-loss".into());
    h.state_mut().inject(Event::Picked(
        PickPurpose::ExportFigures,
        Some(dir.path().to_path_buf()),
    ));
    wait_for_notification(&mut h, 1);
    let note = &h.state().notifications[0];
    assert!(
        !note.error && note.text.starts_with("exported 4 files to"),
        "{}",
        note.text
    );
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["train-loss.csv", "train-loss.json", "train-loss.png", "train-loss.svg"]
    );
    // The CSV holds the plotted lines: the loss and its one term ("ce"), five steps each.
    let csv = std::fs::read_to_string(dir.path().join("train-loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 5, "{csv}");
    assert!(csv.contains("\"ce\",5,1.6"), "{csv}");

    // A folder under a regular file cannot be made: an error, and no file appears anywhere.
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    h.state_mut()
        .inject(Event::Picked(PickPurpose::ExportFigures, Some(blocker.join("figures"))));
    wait_for_notification(&mut h, 2);
    let note = &h.state().notifications[1];
    assert!(
        note.error && note.text.contains("export failed after 0 files") && note.text.contains("a-file"),
        "{}",
        note.text
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 5);
}

#[test]
fn tabs_switch_by_click() {
    let mut h = harness(dry_app());
    h.run_steps(4);
    h.get_by_label("Trade-off").click();
    h.run_steps(4);
    assert_eq!(h.state().settings.tab, Tab::TradeOff);
    h.get_by_label_contains("Accuracy against eps");
}

fn summary(name: &str) -> awnet_lab::gui::worker::ModelSummary {
    awnet_lab::gui::worker::ModelSummary {
        path: PathBuf::from(format!("{name}.safetensors")),
        name: name.into(),
        description: "small-cnn static".into(),
        parameters: 1,
        is_awnet: false,
        log: Vec::new(),
    }
}

fn analyses(models: &[&str], layer: &str) -> Box<awnet_lab::analysis::filters::FiltersAnalysis> {
    use awnet_lab::analysis::filters::{LayerWeights, analyse};
    let weights = |shift: f64| {
        vec![
            LayerWeights {
                name: "stem.conv".into(),
                shape: vec![2, 1, 3, 3],
                values: (0..18).map(|i| i as f64 / 18.0 - 0.5 + shift).collect(),
            },
            LayerWeights {
                name: "fc".into(),
                shape: vec![2, 2],
                values: vec![0.1, -0.2, 0.3 + shift, 0.0],
            },
        ]
    };
    let named: Vec<_> = models
        .iter()
        .enumerate()
        .map(|(i, m)| (m.to_string(), weights(0.1 * i as f64)))
        .collect();
    Box::new(analyse(&named, layer, 20, 0.01))
}

/// Selecting a layer or a second model asks the worker for a new analysis; its result, and
/// only the newest, is what the tab shows.
#[test]
fn filters_tab_follows_the_selection() {
    let mut app = dry_app();
    app.models = vec![summary("standard"), summary("robust")];
    app.settings.tab = Tab::Filters;
    let mut h = harness(app);
    h.run_steps(4);
    let requests = |h: &Harness<App>| -> Vec<awnet_lab::gui::filters_tab::FiltersRequest> {
        h.state()
            .sent
            .iter()
            .filter_map(|c| match c {
                Command::AnalyseFilters(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    };
    let first = requests(&h);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].models.len(), 2, "both open models are compared by default");

    // Untick the second model: a new request for one model.
    h.get_by_role_and_label(egui::Role::CheckBox, "robust").click();
    h.run_steps(4);
    let r = requests(&h);
    assert_eq!(r.len(), 2);
    assert_eq!(r[1].models, vec![PathBuf::from("standard.safetensors")]);

    // The result of the old request is dropped; the newest one is shown.
    let g_old = r[0].generation;
    let g_new = r[1].generation;
    h.state_mut().inject(Event::Filters {
        generation: g_old,
        result: Ok(analyses(&["standard", "robust"], "all layers pooled")),
    });
    h.run_steps(4);
    assert!(h.state().filters.result.is_none());
    h.state_mut().inject(Event::Filters {
        generation: g_new,
        result: Ok(analyses(&["standard"], "all layers pooled")),
    });
    h.run_steps(4);
    assert!(h.state().filters.result.is_some());
    h.get_by_label("Weights of all layers pooled");

    // Picking a layer asks for that layer.
    h.state_mut().filters.layer = "fc".into();
    h.run_steps(4);
    let r = requests(&h);
    assert_eq!(r.last().unwrap().layer, "fc");
    let g = r.last().unwrap().generation;
    h.state_mut().inject(Event::Filters {
        generation: g,
        result: Ok(analyses(&["standard"], "fc")),
    });
    h.run_steps(4);
    h.get_by_label("Weights of fc");
    h.get_by_label_contains("Kernels of fc in standard");

    // Export draws from the same analysis: the plotted histogram, point for point.
    let (figs, tables) = h.state().tab_figures();
    assert_eq!(figs.len(), 2);
    assert_eq!(tables.len(), 1);
    let a = h.state().filters.result.as_ref().unwrap();
    let plotted = awnet_lab::export::figures::steps(a.histograms[0].as_ref().unwrap(), true);
    assert_eq!(figs[0].series[0].points, plotted);
    assert_eq!(figs[0].to_csv().lines().count(), plotted.len() + 1);
}

/// A real router analysis of a small AW-Net on four bundled images (FGSM), with its router's
/// signal heads perturbed so that signals differ from 1.
fn router_analysis() -> Box<awnet_lab::analysis::router::RouterAnalysis> {
    use awnet_lab::attack::{AttackConfig, AttackKind};
    use awnet_lab::model::{Arch, Model, ModelConfig, ModelKind};
    use awnet_lab::observe::{Outcome, Silent};
    let ds = awnet_lab::data::load(
        awnet_lab::data::resolve::assets_dir()
            .join("fashion-mnist-subset")
            .to_str()
            .unwrap(),
        awnet_lab::data::Split::Test,
        None,
    )
    .unwrap();
    let mut c = ModelConfig::new(Arch::SmallCnn, ModelKind::Awnet, 1, 28, 10);
    c.width = 4;
    let m = Model::new(c, 3, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    for (name, var) in m.named_vars() {
        if name.contains("signal_heads") && name.ends_with("weight") {
            let t = crate::common::tensor(var.dims(), 5, -0.5, 0.5, candle_core::DType::F32);
            var.set(&t).unwrap();
        }
    }
    let net = m.frozen().unwrap();
    let Outcome::Done(r) =
        awnet_lab::analysis::router::analyse(&net, &ds, 4, &AttackConfig::new(AttackKind::Fgsm, 0.1), 2, &mut Silent)
            .unwrap()
    else {
        unreachable!()
    };
    Box::new(r)
}

#[test]
fn router_analysis_adds_up() {
    let r = router_analysis();
    assert_eq!(
        (r.n, r.p_adv_clean.len(), r.p_adv_adv.len(), r.images.len()),
        (4, 4, 4, 2)
    );
    assert!((0.0..=1.0).contains(&r.auc));
    assert_eq!(r.blocks.len(), 3);
    for b in &r.blocks {
        assert_eq!(
            b.hist_clean.total() + b.hist_clean.outside,
            4 * b.filter_mean_clean.len() as u64
        );
    }
    let e = &r.images[0].effective;
    assert_eq!(e.len(), 3, "three weight-varied convolutions");
    assert_eq!(e[0].hist_base.total(), e[0].hist_adv.total());
    // Signals were perturbed away from 1, so some filter's scaling differs between the twins.
    assert!(e.iter().any(|x| x.most_changed[0].1 != x.most_changed[0].2));
}

#[test]
fn router_tab_shows_results_when_the_event_arrives() {
    let mut app = dry_app();
    let mut aw = summary("aw");
    aw.is_awnet = true;
    app.models = vec![summary("standard"), aw];
    app.settings.tab = Tab::Router;
    let mut h = harness(app);
    h.run_steps(4);
    let generation = h
        .state()
        .sent
        .iter()
        .find_map(|c| match c {
            Command::AnalyseRouter(r) => Some(r.generation),
            _ => None,
        })
        .expect("opening the tab asks for an analysis of the AW-Net model");
    assert!(h.query_by_label_contains("type accuracy").is_none());
    h.state_mut().inject(Event::Router {
        generation,
        result: Ok(Some(router_analysis())),
    });
    h.run_steps(4);
    h.get_by_label_contains("type accuracy");
    h.get_by_label_contains("Effective filters W * omega");
}

fn attack_jobs(h: &Harness<App>) -> Vec<awnet_lab::gui::attack_tab::AttackJob> {
    h.state()
        .sent
        .iter()
        .filter_map(|c| match c {
            Command::Attack(j) => Some(j.clone()),
            _ => None,
        })
        .collect()
}

/// A real attack result for the fake events: PGD on a bundled picture with a small model.
fn lab_output(eps: f64) -> Box<awnet_lab::gui::attack_tab::AttackOutput> {
    use awnet_lab::attack::{AttackConfig, AttackKind};
    use awnet_lab::model::{Arch, Model, ModelConfig, ModelKind};
    use awnet_lab::observe::Outcome;
    let mut c = ModelConfig::new(Arch::SmallCnn, ModelKind::Static, 1, 28, 10);
    c.width = 4;
    let net = Model::new(c, 1, candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap()
        .frozen()
        .unwrap();
    let img = awnet_lab::data::image::load(&awnet_lab::gui::attack_tab::gallery()[0], 1, 28).unwrap();
    let mut cfg = AttackConfig::new(AttackKind::Pgd, eps);
    cfg.steps = Some(5);
    let Outcome::Done(result) =
        awnet_lab::attack::lab::attack_one(&net, None, &img.pixels, 1, 28, Some(0), &cfg, &|| false).unwrap()
    else {
        unreachable!()
    };
    Box::new(awnet_lab::gui::attack_tab::AttackOutput {
        result,
        class_names: (0..10).map(|i| format!("class {i}")).collect(),
        source: "bundled picture".into(),
        label_source: "given".into(),
    })
}

#[test]
fn moving_eps_issues_a_new_attack_and_old_results_are_ignored() {
    let mut app = dry_app();
    app.models = vec![summary("standard")];
    app.settings.tab = Tab::AttackLab;
    let mut h = harness(app);
    h.run_steps(4);
    let first = attack_jobs(&h);
    assert_eq!(first.len(), 1, "opening the tab attacks the first gallery picture");
    assert_eq!(first[0].config.eps, 0.1);

    // Drag the eps slider: its value changes, and a new job goes out.
    let slider = h.get_by_role_and_label(egui::Role::Slider, "eps");
    slider.focus();
    h.run_steps(2);
    h.key_press(egui::Key::ArrowRight);
    h.run_steps(4);
    let jobs = attack_jobs(&h);
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert!(jobs[1].config.eps > 0.1);
    assert!(jobs[1].generation > jobs[0].generation);

    // The old job's result arrives late: ignored. The new one's is shown.
    h.state_mut().inject(Event::Attack {
        generation: jobs[0].generation,
        result: Ok(Some(lab_output(0.1))),
    });
    h.run_steps(4);
    assert!(h.state().attack.output.is_none());
    h.state_mut().inject(Event::Attack {
        generation: jobs[1].generation,
        result: Ok(Some(lab_output(jobs[1].config.eps))),
    });
    h.run_steps(4);
    assert!(h.state().attack.output.is_some());
    h.get_by_label_contains("The attack's objective per iteration");
}

#[test]
fn a_saved_adversarial_png_decodes_to_exactly_its_pixels() {
    let out = lab_output(8.0 / 255.0);
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("adv.png");
    let paths = awnet_lab::attack::lab::save(&out.result, &png, serde_json::json!({})).unwrap();
    assert_eq!(paths.len(), 3);
    let decoded = image::open(&png).unwrap().to_luma8().into_raw();
    assert_eq!(decoded, out.result.adversarial);
    assert!(out.result.linf <= 8.0 / 255.0 + 1e-9);
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(&paths[2]).unwrap()).unwrap();
    assert_eq!(record["result"]["settings"]["eps"], serde_json::json!(8.0 / 255.0));
    assert!(paths[1].is_file());
}

/// Accuracy against eps on the shipped standard model: the clean accuracy at eps 0, and never
/// rising with eps.
#[test]
fn trade_off_curve_starts_at_clean_accuracy_and_never_rises() {
    use awnet_lab::attack::{AttackConfig, AttackKind};
    let m = awnet_lab::model::checkpoint::open(&crate::common::repo().join("models/standard.safetensors")).unwrap();
    let ds = awnet_lab::data::load(
        awnet_lab::data::resolve::assets_dir()
            .join("fashion-mnist-subset")
            .to_str()
            .unwrap(),
        awnet_lab::data::Split::Test,
        None,
    )
    .unwrap();
    let mut cfg = AttackConfig::new(AttackKind::Pgd, 0.0);
    cfg.steps = Some(5);
    let eps = [0.0, 0.01, 0.03, 0.1];
    let awnet_lab::observe::Outcome::Done(c) =
        awnet_lab::analysis::tradeoff::sweep_model(&m, &ds, 60, &cfg, &eps, &mut awnet_lab::observe::Silent).unwrap()
    else {
        unreachable!()
    };
    assert_eq!(c.points.len(), 4);
    assert_eq!(c.points[0].1, c.clean_accuracy);
    assert!(c.clean_accuracy > 0.5, "{c:?}");
    for w in c.points.windows(2) {
        assert!(w[1].1 <= w[0].1, "{:?}", c.points);
    }
    assert!(!c.checks.is_empty());
}

#[test]
fn compute_asks_for_a_sweep_of_every_open_model() {
    let mut app = dry_app();
    app.models = vec![summary("standard"), summary("robust")];
    app.settings.tab = Tab::TradeOff;
    let mut h = harness(app);
    h.run_steps(4);
    h.get_by_label("Compute").click();
    h.run_steps(4);
    let sweeps: Vec<_> = h
        .state()
        .sent
        .iter()
        .filter_map(|c| match c {
            Command::Sweep(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(sweeps.len(), 1);
    assert_eq!(sweeps[0].models.len(), 2);
    assert_eq!(sweeps[0].eps, vec![0.0, 0.025, 0.05, 0.1, 0.15, 0.2]);
}
