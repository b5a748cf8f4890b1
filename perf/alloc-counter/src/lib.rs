//! A counting global allocator: `System` underneath, with the number of
//! allocations and bytes counted per thread (what the calling thread itself
//! allocates per call) and per process (that plus background threads, e.g. a
//! span exporter). Install it in a bench with
//! `#[global_allocator] static A: ringside_perf::alloc::Counting = ringside_perf::alloc::Counting;`.
//!
//! A crate of its own because a [`GlobalAlloc`] cannot be implemented without
//! `unsafe`: the benchmark crates (`ringside-perf`, its binaries and benches)
//! forbid unsafe code, and re-export this crate as `ringside_perf::alloc`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// The allocator. Counting costs two thread-local adds and two relaxed
/// atomic adds per allocation; both sides of a comparison pay it.
#[derive(Debug)]
pub struct Counting;

static PROCESS_ALLOCS: AtomicU64 = AtomicU64::new(0);
static PROCESS_BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    // `const` initialisers: no lazy initialisation, so no allocation from
    // inside the allocator.
    static THREAD_ALLOCS: Cell<u64> = const { Cell::new(0) };
    static THREAD_BYTES: Cell<u64> = const { Cell::new(0) };
}

fn count(bytes: usize) {
    PROCESS_ALLOCS.fetch_add(1, Ordering::Relaxed);
    PROCESS_BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
    // `try_with`: during thread teardown the slot may be gone; such
    // allocations then count for the process only.
    let _ = THREAD_ALLOCS.try_with(|c| c.set(c.get() + 1));
    let _ = THREAD_BYTES.try_with(|c| c.set(c.get() + bytes as u64));
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees hold; counting touches no memory the
// caller owns.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: forwarded with the caller's layout (see the impl).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A realloc is an allocation for the question "does it allocate".
        count(new_size);
        // SAFETY: forwarded unchanged; `ptr` came from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocations and bytes so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Allocation calls (alloc, alloc_zeroed, realloc).
    pub allocs: u64,
    /// Bytes requested by them.
    pub bytes: u64,
}

impl Counts {
    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: Counts) -> Counts {
        Counts {
            allocs: self.allocs.saturating_sub(earlier.allocs),
            bytes: self.bytes.saturating_sub(earlier.bytes),
        }
    }
}

/// The calling thread's counts (zero unless [`Counting`] is the global
/// allocator).
pub fn thread_counts() -> Counts {
    Counts {
        allocs: THREAD_ALLOCS.with(Cell::get),
        bytes: THREAD_BYTES.with(Cell::get),
    }
}

/// The whole process's counts.
pub fn process_counts() -> Counts {
    Counts {
        allocs: PROCESS_ALLOCS.load(Ordering::Relaxed),
        bytes: PROCESS_BYTES.load(Ordering::Relaxed),
    }
}
