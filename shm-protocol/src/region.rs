//! The memory a ring lives in: a shared-memory mapping in production, the
//! heap in tests and benchmarks (and under miri), loom-owned atomics under
//! loom. The protocol code sees only a [`RingView`].

use crate::inflight::{InflightTable, TableView};
use crate::layout::{Detail, MAX_INFLIGHT, OverflowMode};
use crate::ring::{Backing, Ring, RingView};
use std::sync::Arc;

/// Settings a new segment's control block starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlDefaults {
    /// Whether the engine writes records from the start.
    pub tracing_enabled: bool,
    /// What a push does when the ring is full.
    pub overflow_mode: OverflowMode,
    /// Span detail the agent produces.
    pub detail: Detail,
}

impl Default for ControlDefaults {
    fn default() -> Self {
        Self {
            tracing_enabled: true,
            overflow_mode: OverflowMode::Overwrite,
            detail: Detail::Phases,
        }
    }
}

/// Why a ring size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    /// The capacity is not a power of two between the limits.
    #[error(
        "ring capacity {0} must be a power of two between {min} and {max}",
        min = crate::layout::MIN_CAPACITY,
        max = crate::layout::MAX_CAPACITY
    )]
    Invalid(u32),
    /// The in-flight table size is over the limit.
    #[error(
        "in-flight table capacity {0} is over the limit of {max}",
        max = crate::layout::MAX_INFLIGHT
    )]
    Inflight(u32),
}

pub(crate) fn check_inflight_capacity(capacity: u32) -> Result<(), CapacityError> {
    if capacity <= MAX_INFLIGHT {
        Ok(())
    } else {
        Err(CapacityError::Inflight(capacity))
    }
}

pub(crate) fn check_capacity(capacity: u32) -> Result<(), CapacityError> {
    if capacity.is_power_of_two()
        && (crate::layout::MIN_CAPACITY..=crate::layout::MAX_CAPACITY).contains(&capacity)
    {
        Ok(())
    } else {
        Err(CapacityError::Invalid(capacity))
    }
}

pub(crate) fn apply_defaults(ring: &Ring, defaults: ControlDefaults) {
    let control = ring.control();
    control.set_overflow_mode(defaults.overflow_mode);
    control.set_detail(defaults.detail);
    control.set_head_sample_ppm(1_000_000);
    control.set_tail_sampling(crate::ring::TailSampling {
        keep_errors: true,
        sample_ppm: 1_000_000,
        ttft_threshold_us: 0,
        e2e_threshold_us: 0,
    });
    control.set_tracing_enabled(defaults.tracing_enabled);
}

#[cfg(not(loom))]
mod raw {
    use super::*;
    use crate::layout::{
        CONTROL_OFFSET, COUNTERS_OFFSET, RING_OFFSET, STEP_CONTROL_OFFSET, STEP_COUNTERS_OFFSET,
        STEP_SLOTS_OFFSET, inflight_offset_for, segment_size, segment_size_with_inflight,
    };
    use crate::step::StepRing;
    use std::alloc::{Layout, alloc_zeroed, dealloc};
    use std::ptr::NonNull;

    /// Builds a view over a segment laid out at `base`.
    ///
    /// # Safety
    /// `base` must be 4096-aligned and point to at least
    /// `segment_size(capacity)` bytes that stay valid (mapped, readable and
    /// writable) for as long as the returned view is used, and `capacity` must
    /// be a power of two.
    pub(crate) unsafe fn view_at(base: NonNull<u8>, capacity: u32) -> RingView {
        // SAFETY: the offsets are inside `segment_size(capacity)` bytes (frozen
        // by the layout tests) and suitably aligned for each region, per the
        // caller's guarantee on `base`.
        unsafe {
            RingView {
                control: base.add(CONTROL_OFFSET).cast(),
                counters: base.add(COUNTERS_OFFSET).cast(),
                slots: base.add(RING_OFFSET).cast(),
                capacity: u64::from(capacity),
            }
        }
    }

    /// Builds a view of a step ring region at `base + offset`.
    ///
    /// # Safety
    /// `base + offset` must be 4096-aligned (or 64-aligned) and point to at
    /// least `STEP_SLOTS_OFFSET + capacity * SLOT_SIZE` bytes that stay valid
    /// for as long as the view is used, and `capacity` must be a power of two.
    pub(crate) unsafe fn step_view_at(base: NonNull<u8>, offset: usize, capacity: u32) -> RingView {
        // SAFETY: per the caller's guarantee the region's control block,
        // counters and slots lie inside the memory, 64-aligned.
        unsafe {
            let region = base.add(offset);
            RingView {
                control: region.add(STEP_CONTROL_OFFSET).cast(),
                counters: region.add(STEP_COUNTERS_OFFSET).cast(),
                slots: region.add(STEP_SLOTS_OFFSET).cast(),
                capacity: u64::from(capacity),
            }
        }
    }

    impl StepRing {
        /// A step ring on the heap, laid out exactly as the region in a
        /// segment: for tests, benchmarks and miri.
        pub fn on_heap(capacity: u32) -> Result<StepRing, CapacityError> {
            check_capacity(capacity)?;
            let size = STEP_SLOTS_OFFSET + capacity as usize * crate::layout::SLOT_SIZE;
            let (base, backing) = heap_image(&[], size).ok_or(CapacityError::Invalid(capacity))?;
            // SAFETY: `base` is 4096-aligned and `size` bytes, owned by `backing`.
            let view = unsafe { step_view_at(base, 0, capacity) };
            Ok(StepRing {
                ring: Ring { view, backing },
            })
        }
    }

    /// Builds a view of the in-flight table of a segment laid out at `base`.
    ///
    /// # Safety
    /// `base` must be 4096-aligned and point to at least `offset + capacity *
    /// INFLIGHT_ENTRY_SIZE` bytes (and at least `RING_OFFSET`) that stay valid
    /// for as long as the view is used; `offset` must be a multiple of 64.
    pub(crate) unsafe fn table_view_at(
        base: NonNull<u8>,
        offset: usize,
        capacity: u32,
    ) -> TableView {
        // SAFETY: per the caller's guarantee every region is inside the
        // allocation or mapping and aligned for its type (64 for entries).
        unsafe {
            TableView {
                control: base.add(CONTROL_OFFSET).cast(),
                counters: base.add(COUNTERS_OFFSET).cast(),
                entries: base.add(offset).cast(),
                capacity,
            }
        }
    }

    /// Zeroed, page-aligned heap memory laid out exactly like a segment.
    pub(crate) struct HeapRegion {
        base: NonNull<u8>,
        layout: Layout,
    }

    // SAFETY: the region is plain memory accessed only through atomics once
    // shared; it owns its allocation.
    unsafe impl Send for HeapRegion {}
    // SAFETY: as above.
    unsafe impl Sync for HeapRegion {}

    impl Backing for HeapRegion {}

    impl Drop for HeapRegion {
        fn drop(&mut self) {
            // SAFETY: allocated in `Ring::on_heap` with exactly this layout.
            unsafe { dealloc(self.base.as_ptr(), self.layout) }
        }
    }

    impl Ring {
        /// A ring on the heap, laid out exactly as in a segment: for tests,
        /// benchmarks and miri, which cannot map shared memory.
        pub fn on_heap(capacity: u32, defaults: ControlDefaults) -> Result<Ring, CapacityError> {
            check_capacity(capacity)?;
            let layout = Layout::from_size_align(segment_size(capacity), 4096)
                .map_err(|_| CapacityError::Invalid(capacity))?;
            // SAFETY: the layout has a non-zero size.
            let base = NonNull::new(unsafe { alloc_zeroed(layout) })
                .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
            // SAFETY: `base` is 4096-aligned, `segment_size(capacity)` bytes,
            // owned by the HeapRegion that the Ring keeps alive.
            let view = unsafe { view_at(base, capacity) };
            let ring = Ring {
                view,
                backing: Arc::new(HeapRegion { base, layout }),
            };
            apply_defaults(&ring, defaults);
            Ok(ring)
        }

        /// A ring with an in-flight table of `inflight_capacity` entries
        /// (1 to [`MAX_INFLIGHT`](crate::MAX_INFLIGHT)) on the heap, laid out
        /// exactly as in a segment: for tests, benchmarks and miri.
        pub fn on_heap_with_inflight(
            capacity: u32,
            inflight_capacity: u32,
            defaults: ControlDefaults,
        ) -> Result<(Ring, InflightTable), CapacityError> {
            check_capacity(capacity)?;
            check_inflight_capacity(inflight_capacity)?;
            if inflight_capacity == 0 {
                return Err(CapacityError::Inflight(0));
            }
            let size = segment_size_with_inflight(capacity, inflight_capacity);
            let (base, backing) = heap_image(&[], size).ok_or(CapacityError::Invalid(capacity))?;
            // SAFETY: `base` is 4096-aligned, `size` bytes, owned by `backing`.
            let view = unsafe { view_at(base, capacity) };
            // SAFETY: the table ends at `size`; its offset is page-aligned.
            let table =
                unsafe { table_view_at(base, inflight_offset_for(capacity), inflight_capacity) };
            let ring = Ring {
                view,
                backing: Arc::clone(&backing),
            };
            apply_defaults(&ring, defaults);
            Ok((ring, InflightTable::new(table, backing)))
        }

        /// A heap ring holding a copy of `bytes` (a whole segment image,
        /// header included), control block and counters as found: for
        /// fuzzing the reader with forged memory.
        #[cfg(feature = "fuzzing")]
        pub(crate) fn on_heap_from_bytes(
            capacity: u32,
            bytes: &[u8],
        ) -> Result<Ring, CapacityError> {
            check_capacity(capacity)?;
            let (base, backing) = heap_image(bytes, segment_size(capacity))
                .ok_or(CapacityError::Invalid(capacity))?;
            // SAFETY: as in `on_heap`.
            let view = unsafe { view_at(base, capacity) };
            Ok(Ring { view, backing })
        }
    }

    /// Zeroed, page-aligned heap memory of `size` bytes (at least
    /// `RING_OFFSET`) starting with a copy of `bytes` (truncated to `size`).
    pub(crate) fn heap_image(bytes: &[u8], size: usize) -> Option<(NonNull<u8>, Arc<dyn Backing>)> {
        let size = size.max(RING_OFFSET);
        let layout = Layout::from_size_align(size, 4096).ok()?;
        // SAFETY: the layout has a non-zero size.
        let base = NonNull::new(unsafe { alloc_zeroed(layout) })
            .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let n = bytes.len().min(size);
        // SAFETY: `base` owns `size >= n` fresh bytes that cannot overlap `bytes`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.as_ptr(), n) };
        Some((base, Arc::new(HeapRegion { base, layout })))
    }
}

#[cfg(all(not(loom), feature = "fuzzing"))]
pub(crate) use raw::heap_image;
#[cfg(not(loom))]
pub(crate) use raw::{step_view_at, table_view_at, view_at};

#[cfg(loom)]
mod model {
    use super::*;
    use crate::layout::{ControlBlock, Counters, InflightSlot, Slot};
    use std::ptr::NonNull;

    /// Loom's atomics cannot live in raw memory; the model owns them here.
    struct LoomRegion {
        control: Box<ControlBlock>,
        counters: Box<Counters>,
        slots: Box<[Slot]>,
        entries: Box<[InflightSlot]>,
    }

    // SAFETY: holds only loom atomics.
    unsafe impl Send for LoomRegion {}
    // SAFETY: as above.
    unsafe impl Sync for LoomRegion {}
    impl Backing for LoomRegion {}

    impl Ring {
        /// A ring made of loom atomics, for the model checker.
        pub fn on_heap(capacity: u32, defaults: ControlDefaults) -> Result<Ring, CapacityError> {
            Ok(Self::on_heap_with_inflight(capacity, 1, defaults)?.0)
        }

        /// A ring and an in-flight table made of loom atomics.
        pub fn on_heap_with_inflight(
            capacity: u32,
            inflight_capacity: u32,
            defaults: ControlDefaults,
        ) -> Result<(Ring, InflightTable), CapacityError> {
            check_capacity(capacity)?;
            check_inflight_capacity(inflight_capacity)?;
            if inflight_capacity == 0 {
                return Err(CapacityError::Inflight(0));
            }
            let region = LoomRegion {
                control: Box::new(ControlBlock::new_for_loom()),
                counters: Box::new(Counters::new_for_loom()),
                slots: (0..capacity).map(|_| Slot::new_for_loom()).collect(),
                entries: (0..inflight_capacity)
                    .map(|_| InflightSlot::new_for_loom())
                    .collect(),
            };
            let table = TableView {
                control: NonNull::from(&*region.control),
                counters: NonNull::from(&*region.counters),
                entries: NonNull::from(&region.entries[0]),
                capacity: inflight_capacity,
            };
            let view = RingView {
                control: NonNull::from(&*region.control),
                counters: NonNull::from(&*region.counters),
                slots: NonNull::from(&region.slots[0]),
                capacity: u64::from(capacity),
            };
            let backing: Arc<dyn Backing> = Arc::new(region);
            let ring = Ring {
                view,
                backing: Arc::clone(&backing),
            };
            apply_defaults(&ring, defaults);
            Ok((ring, InflightTable::new(table, backing)))
        }
    }
}
