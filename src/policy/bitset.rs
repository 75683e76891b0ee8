//! Fixed-size bit sets and bit matrices over pod indices: the matrix engine's workhorse.

/// A set of indices `0..len`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitSet {
    words: Vec<u64>,
    len: usize,
}

impl BitSet {
    pub fn empty(len: usize) -> Self {
        BitSet { words: vec![0; len.div_ceil(64)], len }
    }

    pub fn full(len: usize) -> Self {
        let mut s = BitSet { words: vec![u64::MAX; len.div_ceil(64)], len };
        s.clear_tail();
        s
    }

    fn clear_tail(&mut self) {
        let rem = self.len % 64;
        if rem != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << rem) - 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    pub fn insert(&mut self, i: usize) {
        self.words[i / 64] |= 1 << (i % 64);
    }

    /// Removes `i` from the set.
    pub fn remove(&mut self, i: usize) {
        self.words[i / 64] &= !(1 << (i % 64));
    }

    pub fn contains(&self, i: usize) -> bool {
        self.words[i / 64] & (1 << (i % 64)) != 0
    }

    pub fn union_with(&mut self, other: &BitSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    pub fn intersect_with(&mut self, other: &BitSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= *b;
        }
    }

    /// `self &= !other`: removes every member of `other`.
    pub fn difference_with(&mut self, other: &BitSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
    }

    /// The indices `0..len` not in this set.
    pub fn complement(&self) -> BitSet {
        let mut out = BitSet { words: self.words.iter().map(|w| !w).collect(), len: self.len };
        out.clear_tail();
        out
    }

    /// `self |= a & b`, without a temporary.
    pub fn union_with_intersection(&mut self, a: &BitSet, b: &BitSet) {
        for ((s, x), y) in self.words.iter_mut().zip(&a.words).zip(&b.words) {
            *s |= *x & *y;
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + bit)
            })
        })
    }

    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }
}

impl FromIterator<usize> for BitSet {
    /// Collects indices; the set's length is one past the largest index.
    fn from_iter<T: IntoIterator<Item = usize>>(iter: T) -> Self {
        let items: Vec<usize> = iter.into_iter().collect();
        let mut s = BitSet::empty(items.iter().max().map_or(0, |m| m + 1));
        for i in items {
            s.insert(i);
        }
        s
    }
}

/// A square boolean matrix, one `BitSet` per row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitMatrix {
    rows: Vec<BitSet>,
}

impl BitMatrix {
    pub fn from_rows(rows: Vec<BitSet>) -> Self {
        BitMatrix { rows }
    }

    pub fn size(&self) -> usize {
        self.rows.len()
    }

    pub fn get(&self, row: usize, col: usize) -> bool {
        self.rows[row].contains(col)
    }

    pub fn row(&self, row: usize) -> &BitSet {
        &self.rows[row]
    }

    pub fn set(&mut self, row: usize, col: usize, value: bool) {
        let w = &mut self.rows[row].words[col / 64];
        if value {
            *w |= 1 << (col % 64);
        } else {
            *w &= !(1 << (col % 64));
        }
    }

    /// The sub-matrix of the given rows/columns (both in the same order).
    pub fn project(&self, keep: &[usize]) -> BitMatrix {
        let rows = keep
            .iter()
            .map(|&i| {
                let mut r = BitSet::empty(keep.len());
                for (nj, &j) in keep.iter().enumerate() {
                    if self.get(i, j) {
                        r.insert(nj);
                    }
                }
                r
            })
            .collect();
        BitMatrix { rows }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_set_holds_exactly_its_length() {
        let s = BitSet::full(70);
        assert_eq!(s.count(), 70);
        assert_eq!(s.iter().last(), Some(69));
    }
}
