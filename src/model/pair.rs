//! Two halves of one small job at once: the calling thread runs one, a helper thread that spins
//! between jobs runs the other.
//!
//! An attack on one image is a chain of a few hundred convolutions of a few hundred
//! microseconds each. Handing half of each to rayon's pool costs a sleep and a wake-up per call
//! (tens of microseconds, erratic on a virtual machine), which made the split slower than none.
//! The helper here stays awake, spinning, for a moment after each job, so a chain of calls
//! pays a few hundred nanoseconds per hand-over; then it parks until the next job.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::*};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long the helper spins for the next job before it parks.
const SPIN: Duration = Duration::from_micros(200);

const IDLE: u8 = 0;
const POSTED: u8 = 1;
const DONE: u8 = 2;
const PANICKED: u8 = 3;

struct Helper {
    state: AtomicU8,
    /// The posted job: the address of a `&(dyn Fn(usize) + Sync)` on the caller's stack, valid
    /// until the job reports DONE or PANICKED.
    job: AtomicUsize,
    /// Taken by the one caller that owns the helper for a job.
    busy: AtomicBool,
    parked: AtomicBool,
    thread: Thread,
}

static HELPER: OnceLock<Option<&'static Helper>> = OnceLock::new();

fn helper() -> Option<&'static Helper> {
    *HELPER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("awnet-pair".into())
            .spawn(move || {
                let h: &'static Helper = Box::leak(Box::new(Helper {
                    state: AtomicU8::new(IDLE),
                    job: AtomicUsize::new(0),
                    busy: AtomicBool::new(false),
                    parked: AtomicBool::new(false),
                    thread: std::thread::current(),
                }));
                let _ = tx.send(h);
                serve(h)
            })
            .ok()?;
        rx.recv().ok()
    })
}

fn serve(h: &'static Helper) -> ! {
    loop {
        let since = Instant::now();
        let mut spins = 0u32;
        while h.state.load(Acquire) != POSTED {
            spins = spins.wrapping_add(1);
            // The clock is read once in a while: it costs more than the spin itself.
            if !spins.is_multiple_of(64) || since.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            h.parked.store(true, SeqCst);
            if h.state.load(SeqCst) != POSTED {
                std::thread::park();
            }
            h.parked.store(false, SeqCst);
        }
        // SAFETY: `both` stored the address of a live `&(dyn Fn(usize) + Sync)` before POSTED
        // and does not return (or unwind) before this job reports DONE or PANICKED.
        let f: &(dyn Fn(usize) + Sync) = unsafe { *(h.job.load(Relaxed) as *const &(dyn Fn(usize) + Sync)) };
        let ok = catch_unwind(AssertUnwindSafe(|| f(1))).is_ok();
        h.state.store(if ok { DONE } else { PANICKED }, Release);
    }
}

/// Waits for the helper's half, also when the caller's half unwinds.
struct Join(&'static Helper);

impl Join {
    fn wait(&self) -> u8 {
        loop {
            match self.0.state.load(Acquire) {
                POSTED => std::hint::spin_loop(),
                s => return s,
            }
        }
    }
}

impl Drop for Join {
    fn drop(&mut self) {
        self.wait();
        self.0.state.store(IDLE, Relaxed);
        self.0.busy.store(false, Release);
    }
}

/// Whether a second core is there to run the helper: rayon may use more than one thread
/// (`RAYON_NUM_THREADS=1` says no) and this process may run on more than one CPU.
pub(crate) fn available() -> bool {
    static CORES: OnceLock<usize> = OnceLock::new();
    rayon::current_num_threads() > 1
        && *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get())) > 1
}

/// `f(0)` on this thread and `f(1)` on the helper, returning when both are done; both on this
/// thread when rayon is limited to one thread (`RAYON_NUM_THREADS=1`) or another caller holds
/// the helper.
pub(crate) fn both(f: &(dyn Fn(usize) + Sync)) {
    let h = match helper() {
        Some(h) if available() && !h.busy.swap(true, Acquire) => h,
        _ => {
            f(0);
            f(1);
            return;
        }
    };
    // The helper reads `f` through this address until `Join` has seen DONE or PANICKED.
    let job: &(dyn Fn(usize) + Sync) = f;
    h.job.store(&raw const job as usize, Relaxed);
    h.state.store(POSTED, SeqCst);
    if h.parked.load(SeqCst) {
        h.thread.unpark();
    }
    let join = Join(h);
    f(0);
    if join.wait() == PANICKED {
        drop(join);
        resume_unwind(Box::new("the helper thread's half of a job panicked"));
    }
}

/// `f(0, &mut v[..at])` and `f(1, &mut v[at..])` at once, as [`both`] runs them.
pub(crate) fn halves<T: Send, R: Send>(v: &mut [T], at: usize, f: impl Fn(usize, &mut [T]) -> R + Sync) -> [R; 2] {
    let (a, b) = v.split_at_mut(at);
    let parts = [Mutex::new(Some(a)), Mutex::new(Some(b))];
    let results = [Mutex::new(None), Mutex::new(None)];
    both(&|t| {
        let part = parts[t].lock().ok().and_then(|mut p| p.take());
        if let Some(part) = part {
            let r = f(t, part);
            if let Ok(mut slot) = results[t].lock() {
                *slot = Some(r);
            }
        }
    });
    results.map(|m| m.into_inner().ok().flatten().expect("both halves ran to the end"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_both_halves_every_time() {
        let hits = [AtomicUsize::new(0), AtomicUsize::new(0)];
        for _ in 0..10_000 {
            both(&|t| {
                hits[t].fetch_add(1, Relaxed);
            });
        }
        assert_eq!(hits.each_ref().map(|h| h.load(Relaxed)), [10_000, 10_000]);
        // After the helper has parked, too.
        std::thread::sleep(Duration::from_millis(5));
        let again = [AtomicUsize::new(0), AtomicUsize::new(0)];
        both(&|t| {
            again[t].fetch_add(1, Relaxed);
        });
        assert_eq!(again.map(|h| h.into_inner()), [1, 1]);
    }

    #[test]
    fn callers_on_many_threads_share_the_helper() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..2_000 {
                        both(&|t| {
                            total.fetch_add(t + 1, Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.into_inner(), 4 * 2_000 * 3);
    }

    #[test]
    fn a_panic_in_either_half_reaches_the_caller_and_frees_the_helper() {
        for side in [0, 1] {
            let r = catch_unwind(|| both(&|t| assert_ne!(t, side, "half {side}")));
            assert!(r.is_err());
        }
        let hits = AtomicUsize::new(0);
        both(&|_| {
            hits.fetch_add(1, Relaxed);
        });
        assert_eq!(hits.into_inner(), 2);
    }
}
