//! One memory budget for the segment buffers of every partition this instance owns.
//!
//! Each partition buffers up to `segment.max_records` / `max_bytes` before a flush, which is
//! right for one busy partition but multiplies with the assignment: eight partitions draining a
//! backlog would each fill a full segment. The budget caps the sum instead. While the total is
//! over `segment.memory_budget_bytes`, any partition holding at least its fair share (total /
//! partitions buffering) flushes early, so the largest buffers go first and memory stays bounded
//! whatever the backlog; with the budget to spare, segments keep their full size.
//!
//! Encoding a flush briefly needs its Arrow batch and Parquet body beside the buffer, so only as
//! many flushes encode at once as there are cores: more would not be faster, only bigger.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What one buffered record is counted as: its payload, its entry in the buffer (the decoded
/// event's strings are byte ranges of the payload, so they add nothing), half as much again for the
/// buffer's spare capacity, and the payload buffer's shared header.
pub fn record_cost(payload_len: usize) -> usize {
    let entry = std::mem::size_of::<crate::segment::ChainedRecord>();
    payload_len + entry + entry / 2 + 64
}

#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
    /// Partitions with a non-empty buffer.
    holders: AtomicUsize,
    encoders: tokio::sync::Semaphore,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            holders: AtomicUsize::new(0),
            encoders: tokio::sync::Semaphore::new(cores),
        })
    }

    /// Waits for an encoding slot; hold the permit while the flush encodes.
    pub async fn encode_permit(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.encoders.acquire().await.expect("the semaphore is never closed")
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Allocations from this size up are mapped on their own and unmapped when freed; smaller ones
/// reuse heap memory. Buffers allocated at every flush are sized to stay below it (`segment.rs`).
pub const MMAP_THRESHOLD_BYTES: usize = 256 * 1024;

/// glibc's malloc raises its mmap threshold whenever a large block is freed; after that, large
/// buffers (a flush's record buffer and Parquet output) come from the heap, fragment it, and stay
/// resident after the flush. A fixed threshold keeps them mapped, so that memory goes back to the
/// OS; fewer arenas keep per-thread free lists from holding more. A fixed threshold also leaves
/// the trim threshold at 128 KiB, so the small buffers of every flush (Parquet pages, Arrow
/// batches) went back to the OS whenever the top of a heap was free, and were faulted in again
/// by the next ones. A heap now keeps up to 16 MiB free at its top; `return_free_memory` still
/// gives everything back once a second.
/// Called by the binary before any other thread runs, and by the benchmark, so that both
/// measure the same allocator.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES as i32);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 * 1024 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// Hands the allocator's free pages back to the kernel. A flush frees a buffer of many small
/// payload allocations at once; glibc keeps most of that resident otherwise (its automatic trim
/// only releases the top of a heap), so a drained backlog left RSS far above what is in use.
/// At most once a second for the whole process: a trim walks every arena and the pages it
/// returns are faulted in again by the next buffers, so trimming after every flush of a backlog
/// cost more CPU than it saved memory.
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::sync::atomic::AtomicU64;
        use std::time::{SystemTime, UNIX_EPOCH};
        static LAST_TRIM_MS: AtomicU64 = AtomicU64::new(0);
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let last = LAST_TRIM_MS.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < 1000
            || LAST_TRIM_MS.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        // SAFETY: malloc_trim only walks the allocator's own free lists.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// The rule both budgets share (segment buffers here, queued records in `source.rs`): over the
/// limit, whoever holds at least an even share of the total (`total / holders`) gives some back,
/// so the largest holders go first and at least one always does.
pub fn over_fair_share(own: usize, total: usize, holders: usize, limit: usize) -> bool {
    own > 0 && total > limit && own.saturating_mul(holders.max(1)) >= total
}

/// What the flowing partitions' queues may hold when paused partitions hold `paused` bytes of a
/// `limit`-byte queue budget: what the paused ones leave, but never less than an eighth of it.
/// A paused queue cannot grow, so counting it in full would let stalled partitions stop every
/// other one; not counting it at all let an outage that stalls the partitions one after another
/// fill the whole budget once per partition. With this floor, all queues together hold at most
/// about the budget plus an eighth of it per paused partition.
pub fn flowing_limit(limit: usize, paused: usize) -> usize {
    limit.saturating_sub(paused).max(limit / 8)
}

/// One partition's part of the budget; releases it when dropped (a revoked worker's buffer).
#[derive(Debug)]
pub struct BudgetShare {
    budget: Arc<MemoryBudget>,
    held: usize,
}

impl BudgetShare {
    pub fn new(budget: Arc<MemoryBudget>) -> Self {
        Self { budget, held: 0 }
    }

    pub fn add(&mut self, bytes: usize) {
        if self.held == 0 && bytes > 0 {
            self.budget.holders.fetch_add(1, Ordering::Relaxed);
        }
        self.held += bytes;
        self.budget.used.fetch_add(bytes, Ordering::Relaxed);
    }

    /// After a flush (or when the buffer is dropped).
    pub fn release(&mut self) {
        if self.held > 0 {
            self.budget.used.fetch_sub(self.held, Ordering::Relaxed);
            self.budget.holders.fetch_sub(1, Ordering::Relaxed);
            self.held = 0;
        }
    }

    /// Whether this partition should flush now to bring the total back under the budget.
    pub fn over_fair_share(&self) -> bool {
        let used = self.budget.used.load(Ordering::Relaxed);
        let holders = self.budget.holders.load(Ordering::Relaxed);
        over_fair_share(self.held, used, holders, self.budget.limit)
    }
}

impl Drop for BudgetShare {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typical_record_costs_about_a_kilobyte() {
        // ~500-byte generator events; a regression here (a field copied out of the payload
        // again, say) would quietly shrink what fits in the budget.
        let cost = record_cost(500);
        assert!((1000..1600).contains(&cost), "{cost}");
    }

    #[test]
    fn under_the_budget_nobody_flushes_early() {
        let budget = MemoryBudget::new(1000);
        let (mut a, mut b) = (BudgetShare::new(budget.clone()), BudgetShare::new(budget.clone()));
        a.add(600);
        b.add(400);
        assert!(!a.over_fair_share() && !b.over_fair_share());
    }

    #[test]
    fn over_the_budget_the_largest_holders_flush_first() {
        let budget = MemoryBudget::new(1000);
        let mut shares: Vec<BudgetShare> = (0..4).map(|_| BudgetShare::new(budget.clone())).collect();
        for (share, bytes) in shares.iter_mut().zip([700, 300, 100, 0]) {
            share.add(bytes);
        }
        // 1100 used by 3 holders: the fair share is ~367, so only the 700-byte buffer flushes.
        let flushing: Vec<bool> = shares.iter().map(BudgetShare::over_fair_share).collect();
        assert_eq!(flushing, vec![true, false, false, false]);
        shares[0].release();
        assert_eq!(budget.used(), 400);
        assert!(shares.iter().all(|s| !s.over_fair_share()));
    }

    #[test]
    fn paused_queues_shrink_what_the_flowing_ones_may_hold_down_to_an_eighth() {
        assert_eq!(flowing_limit(800, 0), 800);
        assert_eq!(flowing_limit(800, 300), 500);
        assert_eq!(flowing_limit(800, 700), 100);
        assert_eq!(flowing_limit(800, 5000), 100);
    }

    #[test]
    fn a_dropped_share_gives_its_bytes_back() {
        let budget = MemoryBudget::new(10);
        let mut a = BudgetShare::new(budget.clone());
        a.add(50);
        let mut b = BudgetShare::new(budget.clone());
        b.add(5);
        drop(a);
        assert_eq!(budget.used(), 5);
        assert!(!b.over_fair_share());
    }
}
