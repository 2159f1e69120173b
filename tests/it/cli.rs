//! The `awnet` binary.

use std::process::{Command, Output};

use crate::common::*;

fn awnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_awnet"))
        .args(args)
        .env_remove("AWNET_DATA")
        .output()
        .unwrap()
}

fn ok_stdout(out: &Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn init_info_and_predict_work_together() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    let subset = repo().join("assets/fashion-mnist-subset");
    ok_stdout(&awnet(&[
        "init",
        "--data",
        subset.to_str().unwrap(),
        "--seed",
        "3",
        "--out",
        model.to_str().unwrap(),
    ]));
    let info: serde_json::Value =
        serde_json::from_str(&ok_stdout(&awnet(&["info", model.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(info["config"]["arch"], "small-cnn");
    assert_eq!(info["config"]["kind"], "awnet");
    assert_eq!(info["parameters"], 102_060);
    assert_eq!(info["sha256"].as_str().unwrap().len(), 64);
    assert!(
        info["layers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"] == "block2.conv.weight" && l["shape"] == serde_json::json!([64, 64, 3, 3]))
    );
    let sample = repo().join("assets/samples/7-sneaker-test9.png");
    let pred: serde_json::Value = serde_json::from_str(&ok_stdout(&awnet(&[
        "predict",
        model.to_str().unwrap(),
        sample.to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    let top5 = pred[0]["top5"].as_array().unwrap();
    assert_eq!(top5.len(), 5);
    let p: Vec<f64> = top5.iter().map(|t| t["probability"].as_f64().unwrap()).collect();
    assert!(p.windows(2).all(|w| w[0] >= w[1]) && p.iter().sum::<f64>() <= 1.0 + 1e-6);
    let tp = &pred[0]["type_probabilities"];
    assert!((tp["clean"].as_f64().unwrap() + tp["adversarial"].as_f64().unwrap() - 1.0).abs() < 1e-5);
    assert_eq!(pred[0]["signals"].as_array().unwrap().len(), 3);
    let text = ok_stdout(&awnet(&["info", model.to_str().unwrap()]));
    assert!(
        text.contains("freshly initialised") && text.contains("102060 trainable"),
        "{text}"
    );
}

#[test]
fn errors_are_one_line_and_a_failing_exit_code() {
    for args in [
        vec!["info", "/no/such/model.safetensors"],
        vec!["info", "Cargo.toml"],
        vec![
            "predict",
            "tests/fixtures/resnet18_w4_legacy.pth",
            "assets/samples/1-trouser-test2.png",
        ],
        vec!["data", "/no/such/data"],
        vec![
            "eval",
            "models/awnet.safetensors",
            "--data",
            "assets/fashion-mnist-subset",
            "--device",
            "gpu",
        ],
        // A build without the `cuda` feature says so, rather than training on the CPU.
        #[cfg(not(feature = "cuda"))]
        vec![
            "train",
            "--method",
            "standard",
            "--epochs",
            "1",
            "--out",
            "/no/such/dir/m.safetensors",
            "--device",
            "cuda",
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_awnet"))
            .args(&args)
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn a_bad_image_among_good_ones_is_reported_and_the_rest_classified() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"garbage").unwrap();
    let model = fixture("resnet18_w4.pth");
    let good = repo().join("assets/samples/8-bag-test18.png");
    let out = awnet(&[
        "predict",
        model.to_str().unwrap(),
        good.to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("8-bag-test18.png") && stdout.contains("replicated grey to RGB"),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.png"));
}

#[test]
fn data_resolution_says_where_the_data_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let fm = dir.path().join("fashion-mnist");
    std::fs::create_dir(&fm).unwrap();
    for f in ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"] {
        std::fs::copy(repo().join("assets/fashion-mnist-subset").join(f), fm.join(f)).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_awnet"))
        .args(["data", "fashion-mnist", "--json"])
        .env("AWNET_DATA", dir.path())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok_stdout(&out)).unwrap();
    assert_eq!(v["images"], 1000);
    assert!(v["source"].as_str().unwrap().contains("$AWNET_DATA"), "{v}");
    assert_eq!(v["name"], "Fashion-MNIST test split");
    // Nothing under $AWNET_DATA for the train split: the next place is used, or the error lists
    // every place tried.
    let out = Command::new(env!("CARGO_BIN_EXE_awnet"))
        .args(["data", "fashion-mnist", "--split", "train"])
        .env("AWNET_DATA", dir.path())
        .output()
        .unwrap();
    if out.status.success() {
        assert!(String::from_utf8_lossy(&out.stdout).contains("Debian"));
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("$AWNET_DATA") && err.contains("bundled subset"), "{err}");
    }
}

#[test]
fn every_command_has_help() {
    for cmd in ["info", "predict", "data", "init", "import"] {
        let out = ok_stdout(&awnet(&[cmd, "--help"]));
        assert!(out.contains("Usage: awnet"), "{cmd}: {out}");
    }
}

#[test]
fn eval_writes_the_json_the_issue_names() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    let subset = repo().join("assets/fashion-mnist-subset");
    let subset = subset.to_str().unwrap();
    ok_stdout(&awnet(&[
        "init",
        "--data",
        subset,
        "--width",
        "4",
        "--out",
        model.to_str().unwrap(),
    ]));
    let out = dir.path().join("report.json");
    let args = [
        "eval",
        model.to_str().unwrap(),
        "--data",
        subset,
        "--n",
        "40",
        "--attack",
        "clean,fgsm,pgd,adaptive,autoattack",
        "--eps",
        "8/255",
        "--steps",
        "3",
        "--apgd-steps",
        "4",
        "--queries",
        "5",
        "--check-n",
        "20",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ];
    let v: serde_json::Value = serde_json::from_str(&ok_stdout(&awnet(&args))).unwrap();
    assert_eq!(
        v,
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&out).unwrap()).unwrap()
    );
    assert!(v["clean_accuracy"].is_number() && v["worst_case_accuracy"].is_number() && v["w_robust"].is_number());
    let attacks = v["attacks"].as_array().unwrap();
    assert_eq!(
        attacks.iter().map(|a| a["name"].as_str().unwrap()).collect::<Vec<_>>(),
        ["fgsm", "pgd", "adaptive", "autoattack"]
    );
    assert!(attacks.iter().all(|a| a["robust_accuracy"].is_number() && a["router"]["auc"].is_number() || a["router"]["auc"].is_null()));
    assert!(attacks[3]["label"].as_str().unwrap().contains("FAB-T not implemented"));
    assert!(attacks[0]["label"].as_str().unwrap().contains("0.0314 (8/255)"));
    assert_eq!(v["checks"].as_array().unwrap().len(), 8);
    assert!(
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["passed"].is_boolean() || c["passed"].is_null())
    );
    for key in ["model_sha256", "dataset", "split", "n_images", "seed", "program"] {
        assert!(!v["record"][key].is_null(), "record.{key}");
    }
    assert_eq!(v["record"]["n_images"], 40);
    // Static models have no router to attack adaptively.
    let stat = dir.path().join("s.safetensors");
    ok_stdout(&awnet(&[
        "init",
        "--kind",
        "static",
        "--data",
        subset,
        "--width",
        "4",
        "--out",
        stat.to_str().unwrap(),
    ]));
    let out = awnet(&[
        "eval",
        stat.to_str().unwrap(),
        "--data",
        subset,
        "--n",
        "5",
        "--attack",
        "adaptive",
    ]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("needs an AW-Net"));
    let out = awnet(&[
        "eval",
        stat.to_str().unwrap(),
        "--data",
        subset,
        "--attack",
        "pgd",
        "--eps",
        "3/0",
    ]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("divides by zero"));
    // --first: a later slice of the split, recorded in the report; past the end is an error.
    let chunk = |first: &str, n: &str| {
        awnet(&[
            "eval",
            stat.to_str().unwrap(),
            "--data",
            subset,
            "--first",
            first,
            "--n",
            n,
            "--attack",
            "clean",
            "--no-checks",
            "--json",
        ])
    };
    let v: serde_json::Value = serde_json::from_str(&ok_stdout(&chunk("30", "10"))).unwrap();
    assert_eq!(
        (v["record"]["first_image"].as_u64(), v["record"]["n_images"].as_u64()),
        (Some(30), Some(10))
    );
    assert!(v["record"]["dataset"].as_str().unwrap().contains("images 30.."), "{v}");
    let out = chunk("100000", "10");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("past the end"));
}

#[test]
fn attack_writes_an_adversarial_png_inside_the_ball() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("resnet18_w4.pth");
    let sample = repo().join("assets/samples/6-shirt-test4.png");
    let adv = dir.path().join("adv.png");
    let args = [
        "attack",
        model.to_str().unwrap(),
        sample.to_str().unwrap(),
        "--attack",
        "pgd",
        "--eps",
        "8/255",
        "--steps",
        "5",
        "--out",
        adv.to_str().unwrap(),
        "--json",
    ];
    let v: serde_json::Value = serde_json::from_str(&ok_stdout(&awnet(&args))).unwrap();
    assert!(v["perturbation"]["linf"].as_f64().unwrap() <= 8.0 / 255.0 + 1e-6);
    assert_eq!(v["label_source"], "the model's clean prediction");
    assert_eq!(v["loss_trace"].as_array().unwrap().len(), 6);
    let back = awnet_lab::data::image::load(&adv, 3, 32).unwrap();
    let orig = awnet_lab::data::image::load(&sample, 3, 32).unwrap();
    assert!(back.pixels.iter().zip(&orig.pixels).all(|(a, b)| a.abs_diff(*b) <= 8));
    assert!(back.pixels != orig.pixels);
}

#[test]
fn train_writes_a_model_and_a_log_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    // The bundled test images, presented as a train split.
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for (from, to) in [
        ("t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz"),
        ("t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    ] {
        std::fs::copy(repo().join("assets/fashion-mnist-subset").join(from), data.join(to)).unwrap();
        std::fs::copy(repo().join("assets/fashion-mnist-subset").join(from), data.join(from)).unwrap();
    }
    let model = dir.path().join("m.safetensors");
    let log = dir.path().join("log.jsonl");
    let common = [
        "--data",
        data.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
        "--holdout",
        "936",
        "--batch-size",
        "32",
        "--monitor-n",
        "16",
        "--monitor-steps",
        "1",
        "--width",
        "4",
        "--attack-steps",
        "1",
    ];
    let run = |extra: &[&str]| {
        let mut args = vec!["train"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&common);
        awnet(&args)
    };
    // A batch that does not fit in memory (here under a 1 MiB cap) is refused before the first
    // step and writes nothing; the same run then starts as usual.
    let mut args = vec!["train", "--method", "pgd-at", "--epochs", "1"];
    args.extend_from_slice(&common);
    let out = Command::new(env!("CARGO_BIN_EXE_awnet"))
        .args(&args)
        .env(awnet_lab::memory::LIMIT_VAR, "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not enough memory: a training step of 32 images needs about"),
        "{err}"
    );
    assert!(!model.exists());
    ok_stdout(&run(&["--method", "pgd-at", "--epochs", "1"]));
    ok_stdout(&run(&["--method", "pgd-at", "--epochs", "2", "--resume"]));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["epoch"], 1);
    assert!(lines[1]["robust_label"].as_str().unwrap().contains("PGD-1"));
    let info: serde_json::Value =
        serde_json::from_str(&ok_stdout(&awnet(&["info", model.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(info["training"]["method"], "pgd-at");
    assert_eq!(info["log_summary"].as_array().unwrap().len(), 2);
    let out = run(&["--method", "awnet", "--epochs", "1"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("teacher"));

    // The router's size and signal range come from the command line and stay with the model.
    let aw = dir.path().join("aw.safetensors");
    let aw_run = |extra: &[&str]| {
        let mut args = vec!["train", "--epochs", "1"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&common[..2]);
        args.extend_from_slice(&["--out", aw.to_str().unwrap()]);
        args.extend_from_slice(&common[6..]);
        awnet(&args)
    };
    for (extra, says) in [
        (
            &["--method", "standard", "--router-channels", "4,6,8"][..],
            "AW-Net only",
        ),
        (
            &["--method", "awnet-free", "--router-channels", "4,6"][..],
            "three channel counts",
        ),
        (&["--method", "awnet-free", "--router-channels", "4,0,8"][..], "above 0"),
        (&["--method", "awnet-free", "--signal-scale=-1"][..], "positive number"),
    ] {
        let out = aw_run(extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{extra:?}: {err}");
        assert!(!aw.exists());
    }
    ok_stdout(&aw_run(&[
        "--method",
        "awnet-free",
        "--router-channels",
        "4,6,8",
        "--signal-scale",
        "1.5",
    ]));
    let info: serde_json::Value =
        serde_json::from_str(&ok_stdout(&awnet(&["info", aw.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(info["config"]["router"]["channels"], serde_json::json!([4, 6, 8]));
    assert_eq!(info["config"]["router"]["signal_scale"], 1.5);
}

/// `awnet figures` on the bundled model and a fresh AW-Net writes every file its manifest lists:
/// SVGs that parse and name every series, PNGs of the requested size, CSV and JSON that read
/// back to the plotted numbers.
#[test]
fn figures_writes_the_listed_files_and_they_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let aw = dir.path().join("aw.safetensors");
    let init = std::process::Command::new(env!("CARGO_BIN_EXE_awnet"))
        .args([
            "init",
            "--arch",
            "small-cnn",
            "--kind",
            "awnet",
            "--width",
            "4",
            "--out",
        ])
        .arg(&aw)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let out = dir.path().join("figs");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_awnet"))
        .args(["figures", "--model"])
        .arg(crate::common::repo().join("models/standard.safetensors"))
        .arg("--compare")
        .arg(&aw)
        .args([
            "--data",
            "fashion-mnist",
            "--n",
            "12",
            "--steps",
            "2",
            "--scale",
            "1",
            "--out",
        ])
        .arg(&out)
        .env("AWNET_DATA", dir.path().join("none"))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let files = manifest["files"].as_array().unwrap();
    let names: Vec<&str> = files.iter().map(|f| f["file"].as_str().unwrap()).collect();
    for want in [
        "weights-all-layers-pooled.svg",
        "weights-block0.conv.png",
        "filter-norms-all-layers-pooled.csv",
        "layer-statistics.csv",
        "router-aw-p-adv.svg",
        "router-aw-roc.json",
        "router-aw-block2-signals.csv",
        "accuracy-vs-eps.svg",
        "trade-off-scatter.png",
        "training-standard.json",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for f in &names {
        let path = out.join(f);
        assert!(path.is_file(), "{f} listed but not written");
        let stem = f.rsplit_once('.').unwrap().0;
        let json_path = out.join(format!("{stem}.json"));
        if f.ends_with(".svg") {
            let svg = std::fs::read_to_string(&path).unwrap();
            let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{f}: {e}"));
            let text: String = doc.descendants().filter_map(|n| n.text()).collect();
            let fig: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
            for s in fig["series"].as_array().unwrap() {
                if s["style"] != "reference" {
                    let name = s["name"].as_str().unwrap();
                    assert!(text.contains(name), "{f} lacks the series {name}");
                }
            }
        } else if f.ends_with(".png") {
            let img = image::open(&path).unwrap();
            assert_eq!((img.width(), img.height()), (720, 480), "{f}");
        } else if f.ends_with(".csv") && !f.starts_with("layer-statistics") {
            // Every plotted point, in order, is a CSV row.
            let fig: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
            let csv = std::fs::read_to_string(&path).unwrap();
            let rows: Vec<(f64, f64)> = csv
                .lines()
                .skip(1)
                .map(|l| {
                    let mut it = l.rsplitn(3, ',');
                    let y = it.next().unwrap().parse().unwrap();
                    let x = it.next().unwrap().parse().unwrap();
                    (x, y)
                })
                .collect();
            let plotted: Vec<(f64, f64)> = fig["series"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|s| {
                    s["points"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap()))
                })
                .collect();
            assert_eq!(rows, plotted, "{f}");
        }
    }
}

/// Kills `awnet train` (SIGKILL) at pseudo-random moments of a run that checkpoints every two
/// steps; every time, the newest checkpoint on disk loads and the run resumes from it.
#[test]
fn killed_runs_always_leave_a_checkpoint_that_loads_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for (from, to) in [
        ("t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz"),
        ("t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    ] {
        std::fs::copy(repo().join("assets/fashion-mnist-subset").join(from), data.join(to)).unwrap();
        std::fs::copy(repo().join("assets/fashion-mnist-subset").join(from), data.join(from)).unwrap();
    }
    let model = dir.path().join("m.safetensors");
    // Far more epochs than can run before the kill; the last round sets a reachable end.
    let args = |resume: bool, epochs: usize| {
        let epochs = epochs.to_string();
        let mut a: Vec<String> = [
            "train",
            "--method",
            "standard",
            "--epochs",
            &epochs,
            "--data",
            data.to_str().unwrap(),
            "--out",
            model.to_str().unwrap(),
            "--holdout",
            "200",
            "--batch-size",
            "16",
            "--monitor-n",
            "16",
            "--monitor-steps",
            "1",
            "--width",
            "4",
            "--checkpoint-every",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let mut seed = 0x5eed_u64;
    let (mut kills, mut resumed) = (0, 0);
    for round in 0..6 {
        let resume = model.is_file();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_awnet"))
            .args(args(resume, 1000))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(std::time::Duration::from_millis(300 + seed % 1500));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        if model.is_file() {
            let (_, state) = awnet_lab::model::checkpoint::load_with_state(&model)
                .unwrap_or_else(|e| panic!("round {round}: the checkpoint does not load: {e:#}"));
            assert!(state.is_some(), "round {round}: no training state");
            resumed += usize::from(resume);
        }
        // No temporary file is left to be mistaken for a model.
        let stray: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.starts_with("m.") && n != "m.safetensors")
            .collect();
        assert!(stray.len() <= 1, "round {round}: {stray:?}");
    }
    eprintln!(
        "kill test: {kills} runs killed mid-way, {resumed} resumed from the newest checkpoint, every checkpoint loaded"
    );
    assert!(kills >= 3, "only {kills} runs were killed mid-way");
    assert!(resumed >= 2, "only {resumed} runs resumed from a checkpoint");
    // A last uninterrupted resume finishes the epoch it was killed in, from what is on disk.
    let (_, state) = awnet_lab::model::checkpoint::load_with_state(&model).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state.unwrap().json).unwrap();
    let epoch = state["epoch"].as_u64().unwrap() as usize;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_awnet"))
        .args(args(true, epoch + 1))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A write that fails halfway, as on a full disk (here the file-size limit of `ulimit -f`, which
/// makes `write` fail with EFBIG once a file passes 16 KiB), is an error naming the file, and
/// leaves neither a half-written file nor a temporary one: every file present is whole.
#[test]
fn a_write_failing_halfway_is_an_error_and_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("figs");
    let run = Command::new("bash")
        .arg("-c")
        .arg(r#"ulimit -f 16; trap "" XFSZ; exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_awnet"))
        .args(["figures", "--model"])
        .arg(repo().join("models/standard.safetensors"))
        .args([
            "--data",
            "fashion-mnist",
            "--n",
            "8",
            "--steps",
            "1",
            "--scale",
            "2",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(err.contains("cannot write") && err.contains("File too large"), "{err}");
    let files: Vec<std::path::PathBuf> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(!files.is_empty(), "the small files before the failure are written");
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!name.ends_with(".tmp"), "a temporary file was left: {name}");
        let bytes = std::fs::read(f).unwrap();
        assert!(bytes.len() < 16 << 10, "{name} is cut at the limit");
        match f.extension().and_then(|e| e.to_str()) {
            Some("svg") => {
                roxmltree::Document::parse(std::str::from_utf8(&bytes).unwrap()).unwrap();
            }
            Some("json") => {
                serde_json::from_slice::<serde_json::Value>(&bytes).unwrap();
            }
            Some("png") => {
                image::load_from_memory(&bytes).unwrap();
            }
            _ => {}
        }
    }
}
