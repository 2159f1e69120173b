//! The bundled data and dataset resolution.

use awnet_lab::data::{self, Split, resolve};

use crate::common::*;

#[test]
fn bundled_subset_is_balanced_real_fashion_mnist() {
    let ds = data::load(
        repo().join("assets").join(resolve::BUNDLED_SUBSET).to_str().unwrap(),
        Split::Test,
        None,
    )
    .unwrap();
    assert_eq!(ds.len(), 1000);
    assert_eq!((ds.channels, ds.height, ds.width), (1, 28, 28));
    let mut counts = [0; 10];
    for &l in &ds.labels {
        counts[usize::from(l)] += 1;
    }
    assert_eq!(counts, [100; 10]);
    assert_eq!(ds.class_names[9], "Ankle boot");
    // The first test image of Fashion-MNIST is an ankle boot; the samples are the first of each class.
    assert_eq!(ds.labels[0], 9);
    let sample = data::image::load(&repo().join("assets/samples/9-ankle-boot-test0.png"), 1, 28).unwrap();
    assert_eq!(sample.pixels, ds.image(0));
    assert_eq!(sample.note, "");
    // The train split is not bundled, and asking for it says so.
    let err = data::load(
        repo().join("assets").join(resolve::BUNDLED_SUBSET).to_str().unwrap(),
        Split::Train,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("train"), "{err}");
}

#[test]
fn image_folders_load_with_warnings_for_unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    for (class, files) in [
        ("boots", ["9-ankle-boot-test0.png"]),
        ("shirts", ["0-tshirt-test19.png"]),
    ] {
        std::fs::create_dir(dir.path().join(class)).unwrap();
        for f in files {
            std::fs::copy(repo().join("assets/samples").join(f), dir.path().join(class).join(f)).unwrap();
        }
    }
    std::fs::write(dir.path().join("shirts/broken.png"), b"not a png").unwrap();
    let ds = data::load(dir.path().to_str().unwrap(), Split::Test, Some((3, 32))).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.class_names, vec!["boots", "shirts"]);
    assert_eq!((ds.channels, ds.height), (3, 32));
    assert_eq!(ds.warnings.len(), 1);
    assert!(ds.warnings[0].contains("broken.png"));
}

#[test]
fn unknown_names_and_paths_say_where_they_looked() {
    let err = data::load("/no/such/folder", Split::Test, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("/no/such/folder"), "{err}");
}
