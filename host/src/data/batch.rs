//! Token streams → batches of windows.
//!
//! A window is `seq_len + 1` consecutive tokens: inputs are the first `seq_len`, targets the
//! last `seq_len`. Training windows start at multiples of `seq_len` (consecutive windows
//! share one token, so every token but the first is a target exactly once per epoch).
//!
//! The order of training windows in epoch `e` is a permutation drawn from a ChaCha8 stream
//! seeded by a hash of `(seed, epoch)` and nothing else — no thread RNG, no global state,
//! no dependence on what was drawn before — and shuffled by our own Fisher–Yates with
//! Lemire's bounded draws, so a `rand` upgrade cannot change the order. Together with the
//! serialisable [`DataCursor`], this makes a resumed run see exactly the batches an
//! uninterrupted one would.
//!
//! Supervised fine-tuning data is examples rather than one stream: each is a row of its own
//! (its ids but the last as inputs, its ids but the first as targets, [`IGNORE_INDEX`] where
//! the loss does not count the token), and a batch is padded to its longest row — TRL's
//! default (`packing=False`, padding to the longest in the batch). With packing, examples are
//! first put into rows of at most `seq_len` positions by best-fit decreasing (TRL's `bfd`
//! strategy): longest first, each into the row it fills best. A packed batch carries the
//! position of every token within its example ([`TokenBatch::positions`]), from which the
//! engine confines attention to each example and models restart their positions. Rows' order
//! is drawn as the windows' is, over rows instead of windows, so [`DataCursor`] counts rows
//! (examples, when they are not packed).
//!
//! Validation windows are in stream order; the stream's tail becomes one last, shorter
//! window padded to `seq_len` with inputs = the pad id and targets = [`IGNORE_INDEX`], so
//! every validation token is evaluated exactly once and padding is never counted.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use super::cache::Tokens;
use super::error::DataError;
use super::sft::LEARN;

/// The target id of padding positions: never a real token, skipped by the loss.
pub const IGNORE_INDEX: u32 = u32::MAX;

const ORDER_DOMAIN: &[u8] = b"codex-ml window order v1";

/// Rows per batch and tokens per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    /// Windows per batch (the last batch of an epoch may have fewer).
    pub batch_size: usize,
    /// Input tokens per window.
    pub seq_len: usize,
}

impl BatchShape {
    fn check(self) -> Result<Self, DataError> {
        if self.batch_size == 0 {
            return Err(DataError::Setting {
                field: "train.batch_size",
                message: "must be at least 1, found 0".to_string(),
            });
        }
        if self.seq_len == 0 {
            return Err(DataError::Setting {
                field: "train.seq_len",
                message: "must be at least 1, found 0".to_string(),
            });
        }
        Ok(self)
    }
}

/// One batch, row-major `[rows, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    /// Input ids, `rows * seq_len`.
    pub inputs: Vec<u32>,
    /// Target ids, `rows * seq_len`; padding is [`IGNORE_INDEX`].
    pub targets: Vec<u32>,
    /// Number of windows.
    pub rows: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Targets that are not padding.
    pub tokens: u64,
    /// The epoch this batch belongs to (0 for validation).
    pub epoch: u64,
    /// Rows packed with several examples: each input's position within its example,
    /// `rows * seq_len` (padding continues the last example); `None` when each row is one
    /// sequence.
    pub positions: Option<Vec<u32>>,
}

pub use codex_formats::checkpoint::DataCursor;

/// The checked shape, the number of rows and the rows of examples batches of `split` serve,
/// packed when `packing`.
fn example_rows(
    tokens: &Tokens,
    examples: Vec<(usize, usize)>,
    shape: BatchShape,
    pad_id: u32,
    packing: bool,
    split: &'static str,
) -> Result<(BatchShape, usize, Examples), DataError> {
    let shape = shape.check()?;
    if examples.is_empty() {
        return Err(DataError::Empty {
            split,
            what: "no example has a token the loss counts within a row of train.seq_len + 1 \
                   tokens; a longer train.seq_len may keep some"
                .to_string(),
        });
    }
    let examples = Examples::new(tokens, examples, pad_id, packing.then_some(shape.seq_len));
    Ok((shape, examples.rows.len(), examples))
}

/// Examples of `lens` positions each, put into rows of at most `capacity` positions by
/// best-fit decreasing: longest first (the earlier of equals first), each into the row whose
/// room it fills best, a new row when none has room. Rows are numbered in the order they were
/// opened, and hold their examples' indices in the order they went in. Every length is at most
/// `capacity`.
pub fn pack_best_fit(lens: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // (room left, row) for every row that has room.
    let mut room = std::collections::BTreeSet::new();
    for i in order {
        let len = lens[i];
        let fits = room.range((len, 0)..).next().copied();
        let (left, row) = match fits {
            Some((left, row)) => {
                room.remove(&(left, row));
                (left, row)
            }
            None => {
                rows.push(Vec::new());
                (capacity, rows.len() - 1)
            }
        };
        rows[row].push(i);
        if left > len {
            room.insert((left - len, row));
        }
    }
    rows
}

/// The order of `windows` training windows in `epoch`: a pure function of its arguments.
pub fn window_order(seed: u64, epoch: u64, windows: usize) -> Vec<usize> {
    let mut h = Sha256::new();
    h.update(ORDER_DOMAIN);
    h.update(seed.to_le_bytes());
    h.update(epoch.to_le_bytes());
    let mut rng = ChaCha8Rng::from_seed(h.finalize().into());
    let mut order: Vec<usize> = (0..windows).collect();
    for i in (1..windows).rev() {
        let j = bounded(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// A uniform draw in `0..bound` (Lemire's multiply-and-reject; `bound > 0`).
fn bounded(rng: &mut ChaCha8Rng, bound: u64) -> u64 {
    let threshold = bound.wrapping_neg() % bound;
    loop {
        let m = u128::from(rng.next_u64()) * u128::from(bound);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// The training batches: shuffled windows, epoch after epoch, without end.
#[derive(Debug)]
pub struct TrainBatches {
    tokens: Tokens,
    shape: BatchShape,
    seed: u64,
    windows: usize,
    cursor: DataCursor,
    /// The window order of `cursor.epoch`.
    order: Vec<usize>,
    /// Supervised fine-tuning examples, when the data is examples.
    examples: Option<Examples>,
}

/// Supervised fine-tuning examples in a token stream: where each row's ids are, and what
/// pads the rows.
#[derive(Debug)]
struct Examples {
    /// (start, length) of each example's ids in the stream, cut to fit a row.
    examples: Vec<(usize, usize)>,
    /// The examples of each row, in order: one each, or several when packed.
    rows: Vec<Vec<usize>>,
    packed: bool,
    pad_id: u32,
    /// Targets the loss counts, over all rows.
    targets: u64,
}

impl Examples {
    /// `examples` one per row, or packed into rows of `packing` positions.
    fn new(
        tokens: &[u32],
        examples: Vec<(usize, usize)>,
        pad_id: u32,
        packing: Option<usize>,
    ) -> Self {
        let targets = examples
            .iter()
            .map(|&(start, len)| {
                tokens[start + 1..start + len]
                    .iter()
                    .filter(|&&id| id & LEARN != 0)
                    .count() as u64
            })
            .sum();
        let rows = match packing {
            // An example of `len` ids fills `len - 1` positions (inputs and targets).
            Some(capacity) => {
                let lens: Vec<usize> = examples.iter().map(|&(_, len)| len - 1).collect();
                pack_best_fit(&lens, capacity)
            }
            None => (0..examples.len()).map(|i| vec![i]).collect(),
        };
        Examples {
            examples,
            rows,
            packed: packing.is_some(),
            pad_id,
            targets,
        }
    }

    /// Positions a row fills.
    fn fill(&self, row: usize) -> usize {
        self.rows[row].iter().map(|&e| self.examples[e].1 - 1).sum()
    }

    /// The batch of rows `which`, padded to the longest.
    fn batch(
        &self,
        tokens: &[u32],
        which: impl Iterator<Item = usize> + Clone,
        epoch: u64,
    ) -> TokenBatch {
        let seq_len = which.clone().map(|r| self.fill(r)).max().unwrap_or(0);
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        let mut positions = Vec::new();
        let mut counted = 0u64;
        let mut rows = 0;
        for r in which {
            let mut filled = 0;
            for &e in &self.rows[r] {
                let (start, len) = self.examples[e];
                let ids = &tokens[start..start + len];
                inputs.extend(ids[..len - 1].iter().map(|&id| id & !LEARN));
                for &id in &ids[1..] {
                    if id & LEARN != 0 {
                        targets.push(id & !LEARN);
                        counted += 1;
                    } else {
                        targets.push(IGNORE_INDEX);
                    }
                }
                positions.extend(0..(len - 1) as u32);
                filled += len - 1;
            }
            let pad = seq_len - filled;
            inputs.extend(std::iter::repeat_n(self.pad_id, pad));
            targets.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
            // Padding continues the row's last example: causal attention keeps the example
            // from seeing it, and its targets are ignored.
            let last = positions.last().map_or(0, |&p| p + 1);
            positions.extend((0..pad as u32).map(|i| if filled == 0 { i } else { last + i }));
            rows += 1;
        }
        TokenBatch {
            inputs,
            targets,
            rows,
            seq_len,
            tokens: counted,
            epoch,
            positions: self.packed.then_some(positions),
        }
    }

    /// Examples, rows, and the share of the rows' positions that hold an example.
    fn packing_stats(&self, seq_len: usize) -> (usize, usize, f64) {
        let filled: usize = (0..self.rows.len()).map(|r| self.fill(r)).sum();
        let room = (self.rows.len() * seq_len).max(1);
        (
            self.examples.len(),
            self.rows.len(),
            filled as f64 / room as f64,
        )
    }
}

impl TrainBatches {
    /// Batches over the training stream `tokens`, ordered by `seed`, starting at epoch 0.
    pub fn new(tokens: Tokens, shape: BatchShape, seed: u64) -> Result<Self, DataError> {
        let shape = shape.check()?;
        let n = tokens.len();
        if n == 0 {
            return Err(DataError::Empty {
                split: "train",
                what: "the documents give no tokens".to_string(),
            });
        }
        if n < shape.seq_len + 1 {
            return Err(DataError::TooFewTokens {
                split: "train",
                tokens: n,
                seq_len: shape.seq_len,
                needed: shape.seq_len + 1,
            });
        }
        let windows = (n - 1) / shape.seq_len;
        Ok(TrainBatches {
            order: window_order(seed, 0, windows),
            tokens,
            shape,
            seed,
            windows,
            cursor: DataCursor::default(),
            examples: None,
        })
    }

    /// Batches of supervised fine-tuning examples: `examples` are (start, length) of each
    /// example's ids in `tokens` (at least 2, and at most `seq_len + 1`: what
    /// [`super::sft::fit_examples`] returns), one per row or, with `packing`, packed into
    /// rows of `seq_len` positions; rows are padded with `pad_id`.
    pub fn examples(
        tokens: Tokens,
        examples: Vec<(usize, usize)>,
        shape: BatchShape,
        seed: u64,
        pad_id: u32,
        packing: bool,
    ) -> Result<Self, DataError> {
        let (shape, windows, examples) =
            example_rows(&tokens, examples, shape, pad_id, packing, "train")?;
        Ok(TrainBatches {
            order: window_order(seed, 0, windows),
            tokens,
            shape,
            seed,
            windows,
            cursor: DataCursor::default(),
            examples: Some(examples),
        })
    }

    /// Windows (or rows of examples) per epoch.
    pub fn windows(&self) -> usize {
        self.windows
    }

    /// For packed examples: how many examples went into how many rows, and the share of the
    /// rows' positions they fill.
    pub fn packing(&self) -> Option<(usize, usize, f64)> {
        self.examples
            .as_ref()
            .filter(|e| e.packed)
            .map(|e| e.packing_stats(self.shape.seq_len))
    }

    /// Batches per epoch (the last one may be short).
    pub fn batches_per_epoch(&self) -> usize {
        self.windows.div_ceil(self.shape.batch_size)
    }

    /// Training tokens (targets the loss counts) per epoch.
    pub fn tokens_per_epoch(&self) -> u64 {
        match &self.examples {
            Some(e) => e.targets,
            None => (self.windows * self.shape.seq_len) as u64,
        }
    }

    /// The shape.
    pub fn shape(&self) -> BatchShape {
        self.shape
    }

    /// Where the stream stands; save it with a checkpoint.
    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }

    /// Continue from a saved cursor.
    pub fn seek(&mut self, cursor: DataCursor) -> Result<(), DataError> {
        if cursor.position > self.windows as u64 {
            return Err(DataError::Setting {
                field: "data cursor",
                message: format!(
                    "position {} is past the {} windows of an epoch: the checkpoint was made \
                     with other data or another seq_len",
                    cursor.position, self.windows
                ),
            });
        }
        if cursor.epoch != self.cursor.epoch {
            self.order = window_order(self.seed, cursor.epoch, self.windows);
        }
        self.cursor = cursor;
        Ok(())
    }

    /// The next batch; after the last window of an epoch comes the next epoch's first.
    pub fn next_batch(&mut self) -> TokenBatch {
        if self.cursor.position as usize >= self.windows {
            self.cursor = DataCursor {
                epoch: self.cursor.epoch + 1,
                position: 0,
            };
            self.order = window_order(self.seed, self.cursor.epoch, self.windows);
        }
        let start = self.cursor.position as usize;
        let rows = self.shape.batch_size.min(self.windows - start);
        if let Some(examples) = &self.examples {
            let which = self.order[start..start + rows].iter().copied();
            let batch = examples.batch(&self.tokens, which, self.cursor.epoch);
            self.cursor.position += rows as u64;
            return batch;
        }
        let seq_len = self.shape.seq_len;
        let mut inputs = Vec::with_capacity(rows * seq_len);
        let mut targets = Vec::with_capacity(rows * seq_len);
        for &w in &self.order[start..start + rows] {
            let window = &self.tokens[w * seq_len..w * seq_len + seq_len + 1];
            inputs.extend_from_slice(&window[..seq_len]);
            targets.extend_from_slice(&window[1..]);
        }
        self.cursor.position += rows as u64;
        TokenBatch {
            inputs,
            targets,
            rows,
            seq_len,
            tokens: (rows * seq_len) as u64,
            epoch: self.cursor.epoch,
            positions: None,
        }
    }
}

/// The validation batches, in a fixed order, addressed by index.
#[derive(Debug)]
pub struct ValBatches {
    tokens: Tokens,
    shape: BatchShape,
    pad_id: u32,
    windows: usize,
    /// Supervised fine-tuning examples, when the data is examples.
    examples: Option<Examples>,
}

impl ValBatches {
    /// Batches over the validation stream `tokens`; padded inputs get `pad_id` (the
    /// tokenizer's pad id, or its end-of-text id when it has none).
    pub fn new(tokens: Tokens, shape: BatchShape, pad_id: u32) -> Result<Self, DataError> {
        let shape = shape.check()?;
        if tokens.len() < 2 {
            return Err(DataError::Empty {
                split: "val",
                what: format!(
                    "{} tokens, and at least 2 are needed for one prediction",
                    tokens.len()
                ),
            });
        }
        let windows = (tokens.len() - 1).div_ceil(shape.seq_len);
        Ok(ValBatches {
            tokens,
            shape,
            pad_id,
            windows,
            examples: None,
        })
    }

    /// Batches of supervised fine-tuning examples, in order; as [`TrainBatches::examples`].
    pub fn examples(
        tokens: Tokens,
        examples: Vec<(usize, usize)>,
        shape: BatchShape,
        pad_id: u32,
        packing: bool,
    ) -> Result<Self, DataError> {
        let (shape, windows, examples) =
            example_rows(&tokens, examples, shape, pad_id, packing, "val")?;
        Ok(ValBatches {
            tokens,
            shape,
            pad_id,
            windows,
            examples: Some(examples),
        })
    }

    /// Number of batches.
    pub fn len(&self) -> usize {
        self.windows.div_ceil(self.shape.batch_size)
    }

    /// Always false: construction refuses an empty stream.
    pub fn is_empty(&self) -> bool {
        self.windows == 0
    }

    /// Number of windows.
    pub fn windows(&self) -> usize {
        self.windows
    }

    /// Targets over all batches (every token but the first; for examples, those the loss
    /// counts).
    pub fn target_tokens(&self) -> u64 {
        match &self.examples {
            Some(e) => e.targets,
            None => self.tokens.len() as u64 - 1,
        }
    }

    /// Batch `index`, or `None` past the end.
    pub fn batch(&self, index: usize) -> Option<TokenBatch> {
        let first = index.checked_mul(self.shape.batch_size)?;
        if first >= self.windows {
            return None;
        }
        let rows = self.shape.batch_size.min(self.windows - first);
        if let Some(examples) = &self.examples {
            return Some(examples.batch(&self.tokens, first..first + rows, 0));
        }
        let seq_len = self.shape.seq_len;
        let mut inputs = Vec::with_capacity(rows * seq_len);
        let mut targets = Vec::with_capacity(rows * seq_len);
        let mut counted = 0u64;
        for w in first..first + rows {
            let start = w * seq_len;
            let end = (start + seq_len + 1).min(self.tokens.len());
            let window = &self.tokens[start..end];
            let real = window.len() - 1;
            inputs.extend_from_slice(&window[..real]);
            inputs.extend(std::iter::repeat_n(self.pad_id, seq_len - real));
            targets.extend_from_slice(&window[1..]);
            targets.extend(std::iter::repeat_n(IGNORE_INDEX, seq_len - real));
            counted += real as u64;
        }
        Some(TokenBatch {
            inputs,
            targets,
            rows,
            seq_len,
            tokens: counted,
            epoch: 0,
            positions: None,
        })
    }
}
