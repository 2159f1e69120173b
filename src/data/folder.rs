//! An image folder: one subfolder per class, PNG or JPEG files inside, converted by the rule
//! of [`super::image`]. Unreadable files become warnings; the rest loads.

use std::path::{Path, PathBuf};

use super::{DataError, Dataset};

const MAX_CLASSES: usize = 256;

fn is_picture(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DataError::io(dir, e))?;
    entries.sort();
    Ok(entries)
}

/// Does `dir` look like an image folder (a subfolder holding a picture)?
pub fn looks_like(dir: &Path) -> bool {
    sorted_entries(dir).is_ok_and(|entries| {
        entries
            .iter()
            .filter(|p| p.is_dir())
            .any(|sub| sorted_entries(sub).is_ok_and(|files| files.iter().any(|f| is_picture(f))))
    })
}

/// Loads every picture under `root/<class>/`, classes in sorted name order.
pub fn load(root: &Path, channels: usize, size: usize) -> Result<Dataset, DataError> {
    let classes: Vec<PathBuf> = sorted_entries(root)?.into_iter().filter(|p| p.is_dir()).collect();
    if classes.is_empty() {
        return Err(DataError::format(root, "no class subfolders in the image folder"));
    }
    if classes.len() > MAX_CLASSES {
        return Err(DataError::format(
            root,
            format!("{} class subfolders (at most {MAX_CLASSES})", classes.len()),
        ));
    }
    let mut ds = Dataset {
        name: format!("image folder {}", root.display()),
        source: format!(
            "{} (centre square, resized to {size}x{size}, {channels} channel(s))",
            root.display()
        ),
        channels,
        height: size,
        width: size,
        class_names: classes
            .iter()
            .map(|c| c.file_name().unwrap_or_default().to_string_lossy().into_owned())
            .collect(),
        images: Vec::new(),
        labels: Vec::new(),
        warnings: Vec::new(),
    };
    for (label, dir) in classes.iter().enumerate() {
        for file in sorted_entries(dir)?.into_iter().filter(|f| is_picture(f)) {
            match super::image::load(&file, channels, size) {
                Ok(img) => {
                    ds.images.extend(img.pixels);
                    ds.labels.push(label as u8);
                }
                Err(e) => ds.warnings.push(e.to_string()),
            }
        }
    }
    if ds.is_empty() {
        return Err(DataError::format(
            root,
            format!("no readable pictures ({} unreadable)", ds.warnings.len()),
        ));
    }
    ds.validated()
}
