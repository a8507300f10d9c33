//! What every fuzz target links: an allocation cap.
//!
//! libFuzzer's `-malloc_limit_mb` needs a sanitizer's malloc hooks, and CI fuzzes without
//! a sanitizer (`--sanitizer none`: a stable toolchain, and Rust code that forbids
//! `unsafe`). So the cap is here instead: any single allocation larger than
//! [`MAX_ALLOCATION`] fails, and Rust aborts with "memory allocation of N bytes failed",
//! which libFuzzer reports as a crash and saves the input. The gateway bounds every length
//! a peer sends before it allocates; an input that makes it allocate this much is a
//! finding. (Total memory is capped by `-rss_limit_mb` in `.ci/fuzz.sh`.)
//!
//! This is the fuzz crate's only `unsafe`: implementing [`GlobalAlloc`] is an unsafe trait
//! impl by definition; it forwards to the system allocator unchanged.

use std::alloc::{GlobalAlloc, Layout, System};

/// The largest single allocation a fuzz target may make: 64 MiB. The largest legitimate
/// one in the gateway's parsers is an identity prefix (4 MiB).
pub const MAX_ALLOCATION: usize = 64 << 20;

/// The system allocator, refusing allocations over [`MAX_ALLOCATION`].
pub struct CappedAllocator;

// SAFETY: every call is forwarded to `System` with the caller's layout, or fails with a
// null pointer, which `GlobalAlloc` allows.
unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout, as the trait requires.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, hence from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;
