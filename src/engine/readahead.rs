//! Adaptive readahead per guest stream, after Linux's on-demand readahead
//! (mm/readahead.c): a miss that does not continue a known stream fetches just its
//! chunk; a miss at the chunk where a recent stream's window ended is sequential and
//! fetches a window twice the stream's last one, up to a maximum.

use super::ChunkIdx;

/// Streams remembered at once (the least recently used one is replaced).
const STREAMS: usize = 16;

#[derive(Clone, Copy, Debug, Default)]
struct Stream {
    /// The chunk after this stream's last window: a miss here is sequential.
    next: u64,
    /// Chunks in the last window (0: unused entry).
    window: u64,
    /// Use stamp for replacement.
    used: u64,
}

/// Recent guest streams, keyed by where their last window ended.
#[derive(Debug, Default)]
pub(crate) struct Streams {
    table: [Stream; STREAMS],
    clock: u64,
}

impl Streams {
    /// A guest miss at chunk `c`: how many chunks from `c` to fetch, at most `max`.
    /// Records the window so a miss where it ends counts as sequential.
    pub(crate) fn window(&mut self, ChunkIdx(c): ChunkIdx, max: u64) -> u64 {
        self.clock += 1;
        let max = max.max(1);
        let (i, w) = match self.table.iter().position(|s| s.window > 0 && s.next == c) {
            Some(i) => (i, (self.table[i].window * 2).min(max)),
            None => {
                let i = (0..STREAMS)
                    .min_by_key(|&i| self.table[i].used)
                    .unwrap_or(0);
                (i, 1)
            }
        };
        self.table[i] = Stream {
            next: c.saturating_add(w),
            window: w,
            used: self.clock,
        };
        w
    }
}

#[cfg(test)]
mod tests {
    use super::{ChunkIdx, Streams};

    #[test]
    fn random_misses_fetch_one_chunk() {
        let mut s = Streams::default();
        for c in [900, 5, 77, 3000, 60, 41, 1_000_000] {
            assert_eq!(s.window(ChunkIdx(c), 128), 1, "chunk {c}");
        }
    }

    #[test]
    fn sequential_misses_double_up_to_the_maximum() {
        let mut s = Streams::default();
        let mut c = 0;
        let mut got = Vec::new();
        for _ in 0..10 {
            let w = s.window(ChunkIdx(c), 16);
            got.push(w);
            c += w;
        }
        assert_eq!(got, [1, 2, 4, 8, 16, 16, 16, 16, 16, 16]);
    }

    #[test]
    fn interleaved_streams_keep_their_windows_and_a_jump_resets() {
        let mut s = Streams::default();
        let (mut a, mut b) = (0u64, 10_000u64);
        for _ in 0..4 {
            a += s.window(ChunkIdx(a), 64);
            b += s.window(ChunkIdx(b), 64);
        }
        assert_eq!(s.window(ChunkIdx(a), 64), 16);
        assert_eq!(s.window(ChunkIdx(b), 64), 16);
        assert_eq!(s.window(ChunkIdx(a + 1000), 64), 1);
    }
}
