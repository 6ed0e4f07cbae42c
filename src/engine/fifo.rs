//! A first-in first-out queue kept in fixed-size chunks, for queues that grow to millions
//! of entries behind a lock (the orders waiting to be settled).
//!
//! A `VecDeque` doubles: at 1,048,576 entries of 72 bytes it copies 72 MB in one go, and
//! the queue of orders to settle does that under the mutex every final order takes, so
//! every worker waited for the copy (a 150-350 ms latency spike at 20k debits/s, ~53 s
//! into a run). Here a push allocates at most one chunk of [`CHUNK`] entries and never
//! moves an existing one. Written here because the crates that do this (segmented or
//! chunked deques) bring far more than these five operations.

use std::collections::VecDeque;

/// Entries per chunk: 4096 × 72 bytes is ~288 KiB, small enough to allocate under a lock
/// and large enough that the chunk list stays short (~300 chunks for 1.2M entries).
pub const CHUNK: usize = 4096;

/// A FIFO queue in chunks of [`CHUNK`] entries.
#[derive(Debug)]
pub struct ChunkedFifo<T> {
    /// Chunks, oldest first; every chunk but the last is full, none is empty.
    chunks: VecDeque<Vec<T>>,
    /// Entries of the first chunk already taken.
    head: usize,
    /// Entries queued.
    len: usize,
}

impl<T> Default for ChunkedFifo<T> {
    fn default() -> Self {
        ChunkedFifo {
            chunks: VecDeque::new(),
            head: 0,
            len: 0,
        }
    }
}

impl<T: Copy> ChunkedFifo<T> {
    /// Queue one entry at the back.
    pub fn push_back(&mut self, t: T) {
        match self.chunks.back_mut() {
            Some(c) if c.len() < CHUNK => c.push(t),
            _ => {
                let mut c = Vec::with_capacity(CHUNK);
                c.push(t);
                self.chunks.push_back(c);
            }
        }
        self.len += 1;
    }

    /// Queue every entry of `it` at the back, in order.
    pub fn extend(&mut self, it: impl IntoIterator<Item = T>) {
        for t in it {
            self.push_back(t);
        }
    }

    /// Entries queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is queued.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forget every entry (and free the chunks).
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.head = 0;
        self.len = 0;
    }

    /// Take entries from the front while `keep` holds, at most `max`.
    pub fn take_front_while(&mut self, max: usize, mut keep: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(first) = self.chunks.front() else {
                break;
            };
            let t = first[self.head];
            if !keep(&t) {
                break;
            }
            out.push(t);
            self.head += 1;
            self.len -= 1;
            if self.head == first.len() {
                self.chunks.pop_front();
                self.head = 0;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Push(u32),
        Take(usize, u32),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => any::<u32>().prop_map(Op::Push),
            2 => (0..3 * CHUNK, any::<u32>()).prop_map(|(n, below)| Op::Take(n, below)),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        /// The same answers as a `VecDeque` for any sequence of operations.
        #[test]
        fn behaves_as_a_vecdeque(
            ops in proptest::collection::vec(op(), 0..200),
            bulk in 0..3 * CHUNK,
        ) {
            let mut q = ChunkedFifo::default();
            let mut model = VecDeque::new();
            q.extend(0..bulk as u32);
            model.extend(0..bulk as u32);
            for o in ops {
                match o {
                    Op::Push(v) => {
                        q.push_back(v);
                        model.push_back(v);
                    }
                    Op::Take(max, below) => {
                        let got = q.take_front_while(max, |v| *v < below);
                        let n = model.iter().take(max).take_while(|v| **v < below).count();
                        let want: Vec<u32> = model.drain(..n).collect();
                        prop_assert_eq!(got, want);
                    }
                    Op::Clear => {
                        q.clear();
                        model.clear();
                    }
                }
                prop_assert_eq!(q.len(), model.len());
                prop_assert_eq!(q.is_empty(), model.is_empty());
            }
            let rest = q.take_front_while(usize::MAX, |_| true);
            prop_assert_eq!(rest, model.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn chunks_are_freed_as_the_front_is_taken() {
        let mut q = ChunkedFifo::default();
        q.extend(0..(3 * CHUNK) as u64);
        assert_eq!(q.chunks.len(), 3);
        let first = q.take_front_while(CHUNK + 1, |_| true);
        assert_eq!(first.len(), CHUNK + 1);
        assert_eq!(q.chunks.len(), 2, "the first chunk is gone");
        assert_eq!(q.len(), 2 * CHUNK - 1);
        assert_eq!(q.take_front_while(1, |_| true), vec![CHUNK as u64 + 1]);
    }
}
