//! Character error rate of OCR lines against a transcription, computed as
//! `tests/reference/ocr/cer.py` does (the script the reference figures
//! came from), so that ours and rapidocr's are measured by one rule.
//!
//! Both sides are normalised (NFKC, so `Ⅲ` is `III`; `⁄` to `/`; curly
//! quotes to straight; `•` to `·`; runs of whitespace to one space; empty
//! lines dropped). Two measures:
//! - `line`: order-free. Lines are matched one to one, greedily by
//!   smallest edit distance; unmatched lines cost their length. Fair on
//!   rotated and multi-column pages, where an engine's line order is not
//!   the reading order.
//! - `seq`: the lines joined in engine order against the transcription.
//!
//! Each with spaces (`ws`) and without (`nows`: PP-OCRv4's recogniser
//! drops most spaces between Latin words).

use unicode_normalization::UnicodeNormalization;

/// One line normalised.
pub fn norm_line(s: &str) -> String {
    let s: String = s
        .nfkc()
        .map(|c| match c {
            '\u{2044}' => '/',
            '\u{2018}' | '\u{2019}' => '\'',
            '\u{201c}' | '\u{201d}' => '"',
            '\u{2022}' => '\u{b7}',
            c => c,
        })
        .collect();
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Normalised, non-empty lines; without any whitespace when `nows`.
pub fn lines<S: AsRef<str>>(raw: &[S], nows: bool) -> Vec<Vec<char>> {
    raw.iter()
        .map(|l| norm_line(l.as_ref()))
        .filter(|l| !l.is_empty())
        .map(|l| if nows { l.chars().filter(|c| !c.is_whitespace()).collect() } else { l.chars().collect() })
        .collect()
}

/// Levenshtein distance between two character strings.
pub fn distance(a: &[char], b: &[char]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Order-free CER of `hyp` lines against `reference` lines (see the module).
pub fn line_cer(hyp: &[Vec<char>], reference: &[Vec<char>]) -> f64 {
    let mut pairs = Vec::with_capacity(hyp.len() * reference.len());
    for (i, r) in reference.iter().enumerate() {
        for (j, h) in hyp.iter().enumerate() {
            pairs.push((distance(h, r), i, j));
        }
    }
    pairs.sort_unstable();
    let (mut used_r, mut used_h, mut edits) = (vec![false; reference.len()], vec![false; hyp.len()], 0usize);
    for (d, i, j) in pairs {
        if used_r[i] || used_h[j] || d >= reference[i].len() + hyp[j].len() {
            continue;
        }
        used_r[i] = true;
        used_h[j] = true;
        edits += d;
    }
    edits += reference.iter().zip(&used_r).filter(|(_, u)| !**u).map(|(r, _)| r.len()).sum::<usize>();
    edits += hyp.iter().zip(&used_h).filter(|(_, u)| !**u).map(|(h, _)| h.len()).sum::<usize>();
    edits as f64 / reference.iter().map(Vec::len).sum::<usize>().max(1) as f64
}

/// CER of the lines joined in order (`\n` between lines).
pub fn seq_cer(hyp: &[Vec<char>], reference: &[Vec<char>]) -> f64 {
    let join = |ls: &[Vec<char>]| ls.join(&'\n');
    let r = join(reference);
    distance(&join(hyp), &r) as f64 / r.len().max(1) as f64
}

/// `line` CER with spaces and without, in percent.
pub fn line_cer_pct<S: AsRef<str>, T: AsRef<str>>(hyp: &[S], reference: &[T]) -> (f64, f64) {
    let ws = line_cer(&lines(hyp, false), &lines(reference, false));
    let nows = line_cer(&lines(hyp, true), &lines(reference, true));
    (100.0 * ws, 100.0 * nows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_cer_py() {
        assert_eq!(norm_line("  Chapter \u{2162}\t \u{201c}hi\u{201d} 1\u{2044}2 "), "Chapter III \"hi\" 1/2");
    }

    #[test]
    fn distances_and_rates() {
        let c = |s: &str| s.chars().collect::<Vec<_>>();
        assert_eq!(distance(&c("kitten"), &c("sitting")), 3);
        assert_eq!(distance(&c(""), &c("abc")), 3);
        // Lines in another order cost nothing order-free.
        let r = [c("hello world"), c("second line")];
        let h = [c("second line"), c("hello world")];
        assert_eq!(line_cer(&h, &r), 0.0);
        assert!(seq_cer(&h, &r) > 0.5);
        // A missing line costs its length; an extra one too.
        assert!((line_cer(&h[..1], &r) - 11.0 / 22.0).abs() < 1e-12);
        let extra = [c("second line"), c("hello world"), c("xyz")];
        assert!((line_cer(&extra, &r) - 3.0 / 22.0).abs() < 1e-12);
    }
}
