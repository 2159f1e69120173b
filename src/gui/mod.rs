//! The window: an eframe shell around [`App`], whose `show` draws everything into one `Ui` so
//! that tests drive it headless with `egui_kittest`.
//!
//! Workers (training, model loading, file dialogs) send [`worker::Event`]s; the tabs emit
//! [`Command`]s, handled in one place ([`App::execute`]).

pub mod app;
pub mod attack_tab;
pub mod filters_tab;
pub mod router_tab;
pub mod tradeoff_tab;
pub mod train_tab;
pub mod worker;

use std::path::PathBuf;

pub use app::{App, Settings, StartOptions, Tab};
use worker::{PickPurpose, TrainRequest};

/// Everything the window can be asked to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    StartTraining(TrainRequest),
    StopTraining,
    OpenModel(PathBuf),
    CloseModel(usize),
    Pick(PickPurpose),
    /// Use this data for training: a name or a folder. `announce`: a failure is also a
    /// notification (the user chose it), not only the data panel's text (the start-up check).
    SetData {
        name: String,
        announce: bool,
    },
    AnalyseFilters(filters_tab::FiltersRequest),
    AnalyseRouter(router_tab::RouterRequest),
    CancelRouter,
    Sweep(tradeoff_tab::SweepRequest),
    CancelSweep,
    Attack(attack_tab::AttackJob),
    /// Export the current tab's figures (`None`) or the one plot of that figure name, to a
    /// folder picked in a dialog.
    Export(Option<String>),
    /// Show a message to the user.
    Notify(String),
}

/// Right-clicking a plot offers to export it alone: `figure` is the name of its
/// [`crate::export::Figure`] in [`App::tab_figures`].
pub fn export_menu(response: &egui::Response, figure: &str, commands: &mut Vec<Command>) {
    response.context_menu(|ui| {
        if ui
            .button("Export this plot…")
            .on_hover_text("SVG, PNG, CSV of the plotted data and JSON with provenance, to a folder")
            .clicked()
        {
            commands.push(Command::Export(Some(figure.to_string())));
            ui.close();
        }
    });
}

/// Opens the window and runs until it is closed.
pub fn run(options: StartOptions) -> anyhow::Result<()> {
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_inner_size([1280.0, 800.0])
            .with_min_inner_size([800.0, 500.0])
            .with_title("AW-Net Lab")
            .with_drag_and_drop(true),
        ..Default::default()
    };
    eframe::run_native(
        "AW-Net Lab",
        native,
        Box::new(move |cc| {
            let stored: Option<Settings> = cc.storage.and_then(|s| eframe::get_value(s, app::SETTINGS_KEY));
            Ok(Box::new(App::new(options, stored, Some(cc.egui_ctx.clone()))))
        }),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))
}
