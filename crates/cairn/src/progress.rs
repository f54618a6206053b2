//! Progress bars on a terminal, silence in pipes.

use std::io::IsTerminal;

use cairn_store::progress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar on stderr (bytes, rate, ETA) when stderr is a terminal; hidden otherwise.
pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    pub fn new(quiet: bool) -> Bar {
        let bar = ProgressBar::hidden();
        if !quiet && std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        Bar { bar }
    }
}

fn style(phase: &str) -> ProgressStyle {
    // GC counts the 256 chunk shards it has listed; everything else counts bytes.
    let template = if phase == "gc" {
        "{msg:>14} [{bar:30}] {pos}/{len} chunk shards ETA {eta}"
    } else {
        "{msg:>14} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}"
    };
    ProgressStyle::with_template(template)
        .expect("valid template")
        .progress_chars("=> ")
}

impl Progress for Bar {
    fn start(&self, phase: &str, total: u64) {
        self.bar.reset();
        self.bar.set_style(style(phase));
        self.bar.set_length(total);
        self.bar.set_position(0);
        self.bar.set_message(phase.to_string());
    }

    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
