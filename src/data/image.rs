//! Reading one picture into a model's input.
//!
//! The rule, applied to every image from a file or a folder: decode (PNG or JPEG, at most
//! 8192x8192 pixels), crop the centre square of side `min(width, height)`, resize it to
//! `size x size` with a triangle (bilinear) filter, then convert to the model's channels: one
//! channel is luma (ITU-R 601-2: 0.299 R + 0.587 G + 0.114 B), three are RGB with grey
//! replicated; alpha is dropped.

use std::path::Path;

use image::{DynamicImage, GenericImageView, ImageReader, Limits, imageops::FilterType};

use super::DataError;

pub const MAX_SIDE: u32 = 8192;

/// An image converted to a model's input.
#[derive(Clone, Debug, PartialEq)]
pub struct Converted {
    /// `[c, size, size]`, 0..=255.
    pub pixels: Vec<u8>,
    /// What was done to the picture, in words (empty when nothing was).
    pub note: String,
}

/// Largest picture file read (a 8192x8192 RGBA PNG that does not compress at all is 256 MiB).
const MAX_FILE_BYTES: u64 = 256 << 20;

/// Decodes `path` with size limits checked before any pixel buffer is allocated.
pub fn decode(path: &Path) -> Result<DynamicImage, DataError> {
    let len = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?.len();
    if len > MAX_FILE_BYTES {
        return Err(DataError::format(
            path,
            format!("cannot decode image (a file of {len} bytes; at most {MAX_FILE_BYTES} are read)"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let mut reader = ImageReader::new(std::io::Cursor::new(&bytes[..]))
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?;
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(&bytes) {
        // The decoder fills a cut-off JPEG with grey and reports success.
        return Err(DataError::format(
            path,
            "cannot decode image (a JPEG without its end marker: the file is truncated)",
        ));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(512 << 20);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| DataError::format(path, format!("cannot decode image ({e})")))
}

/// Whether an end-of-image marker follows the last start-of-scan: inside compressed data every
/// 0xFF byte is followed by 0x00, so `FF D9` there is the real end.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xff, 0xda]);
    let end = bytes.windows(2).rposition(|w| w == [0xff, 0xd9]);
    matches!((last_scan, end), (Some(s), Some(e)) if e > s)
}

/// Converts a decoded image by the module's rule.
pub fn convert(img: &DynamicImage, channels: usize, size: usize) -> Result<Converted, DataError> {
    let (w, h) = img.dimensions();
    let mut steps = Vec::new();
    let side = w.min(h);
    let mut img = if w != h {
        steps.push(format!("centre-cropped {w}x{h} to {side}x{side}"));
        img.crop_imm((w - side) / 2, (h - side) / 2, side, side)
    } else {
        img.clone()
    };
    if side as usize != size {
        steps.push(format!("resized {side}x{side} to {size}x{size} (bilinear)"));
        img = img.resize_exact(size as u32, size as u32, FilterType::Triangle);
    }
    let colour = img.color();
    let pixels = match channels {
        1 => {
            if colour.has_color() {
                steps.push("converted colour to grey (luma)".into());
            }
            img.to_luma8().into_raw()
        }
        3 => {
            if !colour.has_color() {
                steps.push("replicated grey to RGB".into());
            }
            let rgb = img.to_rgb8();
            let (s, plane) = (size, size * size);
            let mut chw = vec![0u8; 3 * plane];
            for (i, px) in rgb.pixels().enumerate() {
                for c in 0..3 {
                    chw[c * plane + i] = px[c];
                }
            }
            debug_assert_eq!(chw.len(), 3 * s * s);
            chw
        }
        c => {
            return Err(DataError::Invalid(format!(
                "images can be converted to 1 or 3 channels, not {c}"
            )));
        }
    };
    if colour.has_alpha() {
        steps.push("dropped alpha".into());
    }
    Ok(Converted {
        pixels,
        note: steps.join(", "),
    })
}

/// Reads a picture file into `[c, size, size]` bytes.
pub fn load(path: &Path, channels: usize, size: usize) -> Result<Converted, DataError> {
    convert(&decode(path)?, channels, size)
}

/// Writes `[c, h, w]` bytes (1 or 3 channels) as a PNG, atomically.
pub fn save_png(path: &Path, pixels: &[u8], channels: usize, height: usize, width: usize) -> Result<(), DataError> {
    let plane = height * width;
    if pixels.len() != channels * plane {
        return Err(DataError::Invalid(format!(
            "{} bytes is not a {channels}x{height}x{width} image",
            pixels.len()
        )));
    }
    let img = match channels {
        1 => DynamicImage::ImageLuma8(
            image::GrayImage::from_raw(width as u32, height as u32, pixels.to_vec()).expect("length checked"),
        ),
        3 => {
            let hwc: Vec<u8> = (0..plane)
                .flat_map(|i| (0..3).map(move |c| pixels[c * plane + i]))
                .collect();
            DynamicImage::ImageRgb8(
                image::RgbImage::from_raw(width as u32, height as u32, hwc).expect("length checked"),
            )
        }
        c => return Err(DataError::Invalid(format!("cannot write a {c}-channel PNG"))),
    };
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| DataError::format(path, format!("cannot encode PNG ({e})")))?;
    crate::fsutil::write_atomic(path, &bytes).map_err(|e| DataError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_resizes_and_converts_with_a_note() {
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_fn(40, 20, |x, _| image::Rgb([x as u8 * 6, 0, 0])));
        let c = convert(&img, 1, 10).unwrap();
        assert_eq!(c.pixels.len(), 100);
        assert!(c.note.contains("centre-cropped 40x20 to 20x20"), "{}", c.note);
        assert!(c.note.contains("resized 20x20 to 10x10"));
        assert!(c.note.contains("luma"));
        let grey = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(28, 28, image::Luma([7])));
        let same = convert(&grey, 1, 28).unwrap();
        assert_eq!(same.note, "");
        assert!(same.pixels.iter().all(|&p| p == 7));
        assert_eq!(convert(&grey, 3, 28).unwrap().pixels.len(), 3 * 784);
    }

    #[test]
    fn png_round_trips_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let pixels: Vec<u8> = (0..3 * 6 * 5).map(|i| (i * 7 % 256) as u8).collect();
        save_png(&path, &pixels, 3, 6, 5).unwrap();
        assert!(load(&path, 3, 6).unwrap().note.contains("cropped"));
        let back = decode(&path).unwrap();
        assert_eq!(back.dimensions(), (5, 6));
        let rgb = back.to_rgb8();
        assert_eq!(rgb.get_pixel(2, 1)[1], pixels[30 + 5 + 2]);
    }
}
